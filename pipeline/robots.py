"""robots.txt, as site owners ask crawlers to honour it (RFC 9309), for the downloader (polite.py).

Each download worker process fetches a host's /robots.txt once, the first time a row of that host is fetched, and
keeps it for the build (a bounded cache; threads asking for the same host wait for the one fetch). The rules are
read by the standard library's `urllib.robotparser` for our agent names: "psdclip" and the `--user-agent-token`
when one is given (so a site that disallows img2dataset's token is honoured by a build that sends it). Answers,
as RFC 9309 (2.3.1) has them:
- 2xx: the file's rules (at most MAX_BYTES of it are read);
- 4xx (404 most often): no rules, everything allowed;
- 5xx, a timeout or a connection error: "unreachable", the whole site disallowed for this build; the rows end
  `robots_unreachable` after a 5xx, or `timeout` / `connection_error` when the host cannot be reached at all (its
  images could not be either), all transient, so `--retry-failed` asks again later.
A disallowed row ends `robots_disallowed`. `--ignore-robots-txt` turns all of this off.
"""
from __future__ import annotations

import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import urllib.robotparser

MAX_BYTES = 512 * 1024  # RFC 9309: crawlers must parse at least 500 KiB
TIMEOUT = 10.0  # seconds for the whole robots.txt response
MAX_HOSTS = 100_000  # cached per process; the oldest are forgotten past it
AGENT = "psdclip"  # the product token robots.txt rules name us by

DISALLOWED = "robots.txt disallows this URL for"  # classify() maps these messages to the statuses
UNREACHABLE = "robots.txt unreachable"


class _Rules:
    """One host's answer: a parser, or everything allowed / disallowed with the reason."""

    def __init__(self, parser=None, allow_all=False, reason=""):
        self.parser, self.allow_all, self.reason = parser, allow_all, reason


class RobotsCache:
    def __init__(self):
        self._rules: dict[tuple[str, str], _Rules] = {}  # (build, origin) -> answer, oldest first
        self._pending: dict[tuple[str, str], threading.Event] = {}
        self._lock = threading.Lock()
        self.fetches = 0  # robots.txt requests made by this process (a test reads it)

    def check(self, url: str, agents: list[str], user_agent: str, opener, timeout: float = TIMEOUT,
              scope: str = "") -> str | None:
        """None when `url` may be fetched; else the row's error message (DISALLOWED... or UNREACHABLE...). `scope`:
        the build the answer is kept for."""
        parts = urllib.parse.urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}".lower()
        rules = self._rules_for(origin, user_agent, opener, timeout, scope)
        if rules.allow_all:
            return None
        if rules.parser is None:
            return f"{UNREACHABLE} ({rules.reason}): the site is treated as disallowed (RFC 9309)"
        refused = [a for a in agents if not rules.parser.can_fetch(a, url)]
        return f"{DISALLOWED} {', '.join(refused)}" if refused else None

    def _rules_for(self, origin: str, user_agent: str, opener, timeout: float, scope: str) -> _Rules:
        key = (scope, origin)
        while True:
            with self._lock:
                if key in self._rules:
                    return self._rules[key]
                waiting = self._pending.get(key)
                if waiting is None:
                    self._pending[key] = threading.Event()
                    break
            waiting.wait(timeout + 5)  # another thread fetches it; then read the cache again
        rules = _Rules(reason="the fetch failed")
        try:
            rules = self._fetch(origin, user_agent, opener, timeout)
        finally:
            with self._lock:
                if len(self._rules) >= MAX_HOSTS:
                    for old in list(self._rules)[:MAX_HOSTS // 10]:
                        del self._rules[old]
                self._rules[key] = rules
                self._pending.pop(key).set()
        return rules

    def _fetch(self, origin: str, user_agent: str, opener, timeout: float) -> _Rules:
        self.fetches += 1
        request = urllib.request.Request(origin + "/robots.txt", headers={"User-Agent": user_agent})
        ends = time.monotonic() + timeout
        try:
            with opener.open(request, timeout=timeout) as r:
                body = bytearray()
                while len(body) < MAX_BYTES and time.monotonic() < ends:
                    chunk = r.read1(65536)
                    if not chunk:
                        break
                    body += chunk
                if time.monotonic() >= ends and len(body) < MAX_BYTES:
                    return _Rules(reason=f"no whole answer within {timeout:g} s")
        except urllib.error.HTTPError as err:
            if 400 <= err.code < 500:
                return _Rules(allow_all=True)
            return _Rules(reason=f"HTTP {err.code}")
        except Exception as err:  # pylint: disable=broad-except  (timeouts, refused connections, TLS)
            return _Rules(reason=str(err)[:200] or type(err).__name__)
        parser = urllib.robotparser.RobotFileParser()
        parser.parse(bytes(body[:MAX_BYTES]).decode("utf-8", errors="replace").splitlines())
        return _Rules(parser=parser)


ROBOTS = RobotsCache()  # one per process, as polite.LIMITER
