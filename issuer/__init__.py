"""issuer: issues government consumption vouchers under a 10:00 surge, never one too many."""

__version__ = "0.1.0"
