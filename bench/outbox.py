"""The development stand-in of SMS.ru and the Telegram Bot API (`devoutbox.py`, what
`make run` sends to) as a process of its own, for the benchmark:

    python bench/outbox.py <directory for the messages> <file to write its URL to>

Runs until SIGTERM or SIGINT.
"""

import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devoutbox import start_outbox  # noqa: E402


def main() -> None:
    directory, url_file = Path(sys.argv[1]), Path(sys.argv[2])
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # the server's threads inherit the mask
    outbox = start_outbox(directory)
    url_file.write_text(outbox.url)
    signal.sigwait(stop)
    outbox.stop()


if __name__ == "__main__":
    main()
