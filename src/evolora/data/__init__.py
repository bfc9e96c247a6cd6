from evolora.data.tasks import Example, Task
from evolora.data.streams import build_stream

__all__ = ["Example", "Task", "build_stream"]
