"""The trainer process: ``[torchrun ...] -m tuneyard.trainer JOBDIR`` (see ``sft`` for the exact commands).

- ``__main__``: parses the command line, loads ``resolved_spec.json``, dispatches on ``spec.method`` and
  turns the outcome or any exception into ``result.json`` (the one place that does).
- ``sft``: the SFT recipe (transformers + PEFT + TRL ``SFTTrainer``); the only module that knows their
  argument names.
- ``progress``: Trainer callbacks: events for the scheduler, complete-checkpoint marks, cooperative stop.
- ``runtime``: ranks, structured logging, the rank-0 ``Reporter``, error codes.

result.json is one of ``tuneyard.jobdir``'s ``Succeeded`` (output_dir, trained tokens and steps, final
metrics, adapter or not), ``Stopped`` (reason "cancel", "pause" or "drain", step, checkpoint) or ``Failed``
(error: a code of ``runtime.ERROR_CODES`` and a message).
"""
