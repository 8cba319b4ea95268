"""A trained run's model, out of greenrun: text from a checkpoint, and the weights for other tools.

  load.py      open a run (a local directory or s3://…): its saved config, one verified checkpoint, its tokens
  sampling.py  text from a model: the trainer's end-of-run sample and `greenrun sample` share it
  hf.py        the weights as a transformers GPT2LMHeadModel directory, with its tokenizer
  export.py    `greenrun export`: --format hf | safetensors

Layered with the trainer (it samples through sampling.py); nothing here imports the job or the CLI.
"""
