"""A small vocabulary (with CJK and emoji) that the load and concurrency tests build text from."""

WORDS = [
    "the", "river", "city", "music", "science", "history", "people", "water", "light", "north",
    "garden", "stone", "bridge", "old", "new", "village", "market", "mountain", "forest",
    "school", "北京", "東京", "서울", "🍕", "🎉",
]  # fmt: skip
