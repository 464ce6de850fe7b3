"""lora-daemon's trainer core: config, data, base models, LoRA injection, training and export.

Importing this package is cheap; torch and friends load only in the modules that need them.
"""

__version__ = "0.1.0"
