"""Supervised fine-tuning data: row formats, validation, chat templates, tokenisation and the prepare step.

``formats`` and ``validate`` import neither torch nor transformers (the API process uses them);
``tokenize`` and ``prepare`` run in the prepare subprocess (``python -m tuneyard.data.prepare JOBDIR``).
"""
