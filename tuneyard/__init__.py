"""tuneyard: a self-hosted fine-tuning service speaking the OpenAI, Simplismart and Llama Stack dialects."""

__version__ = "0.1.0"
