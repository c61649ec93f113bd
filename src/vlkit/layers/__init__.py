"""Small shared building blocks used by every model family."""
