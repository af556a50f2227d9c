"""What SQS accepts in a message body, for every message this consumer sends."""

from __future__ import annotations

import re

# SQS refuses a message with any character outside #x9 | #xA | #xD | #x20-#xD7FF |
# #xE000-#xFFFD | #x10000-#x10FFFF (SendMessage, "MessageBody"): U+FFFE and U+FFFF reach
# order data (and so dead letters) from any client that writes them to DynamoDB.
_REFUSED = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def json_body(data: bytes) -> str:
    """JSON bytes as a message body SQS accepts: the characters it refuses become JSON
    \\u escapes, so the body still decodes to the same document."""
    return _REFUSED.sub(lambda m: f"\\u{ord(m.group()):04x}", data.decode())
