"""voxaffect's engine: audio in, analysed windows out. Plain Python over numpy and torch."""

SAMPLE_RATE = 16_000
"""Every stage after decoding works on mono float32 audio at this rate."""

DEFAULT_MODEL = "iic/emotion2vec_plus_large"
"""The checkpoint served unless told otherwise (a ModelScope id; downloaded on first use)."""
