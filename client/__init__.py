"""The Python client for voxaffect's streaming protocol (``voxaffect stream`` uses it)."""

from client.stream import ServerError, StreamClient, stream_file

__all__ = ["ServerError", "StreamClient", "stream_file"]
