"""pcopt: polynomial weight preconditioning (PC layer) with Muon and AdamW for LLM pretraining."""

__version__ = "0.1.0"
