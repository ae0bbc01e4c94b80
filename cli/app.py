"""Placeholder."""
def main() -> None:
    print("llmswarm")
