"""Log lines as JSON objects (setting ``log-format: json``), for log pipelines that
index fields rather than parse text: one object per line with the time (RFC 3339, UTC),
level, logger, message and, when there is one, the exception's traceback."""

from __future__ import annotations

import datetime
import json
import logging

logger = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def use_json_logs(root: logging.Logger = logging.getLogger()) -> None:
    """Switch every handler of ``root`` (adding one on stderr if it has none) to JSON."""
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter())
