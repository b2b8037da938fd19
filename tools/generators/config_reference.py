"""Print the config reference (every key, its default and meaning) as a Markdown table.

python tools/generators/config_reference.py     # the table in docs/config.md comes from here
"""

from scalora_dist.config import Config, iter_keys


def markdown() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in iter_keys(Config):
        rows.append(f"| `{key}` | `{default!r}` | {doc.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
