"""greenrun: a training launcher for GPT-2-style models that counts dollars, kWh and kgCO2."""

__version__ = "0.1.0"
