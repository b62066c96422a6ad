"""The one exception type entry scripts turn into a one-line message and exit code 2."""


class UserInputError(ValueError):
    """Bad input the user can fix: the message names the problem and the fix."""


def clip(text: str, limit: int = 160) -> str:
    """`text` cut to at most `limit` characters at a word boundary, with "..." when cut."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 3].rsplit(" ", 1)[0].rstrip(" ,;:(")
    return cut + "..."
