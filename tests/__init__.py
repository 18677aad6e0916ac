"""voxaffect's tests. LABELS: the nine emotion2vec+ labels every result must carry."""

LABELS = (
    "angry",
    "disgusted",
    "fearful",
    "happy",
    "neutral",
    "other",
    "sad",
    "surprised",
    "unknown",
)
