"""Constants every stage of the data package shares (a leaf module: it imports nothing)."""

IGNORE_INDEX = -100
"""Label of a token that carries no loss (cross-entropy's ``ignore_index``)."""
