#!/usr/bin/env python3
"""A handoff worker in plain Python 3.11 (standard library only).

Run with:

    cargo run -- run --workers 2 -- python3 examples/worker.py
    curl -i http://127.0.0.1:8000/

The master accepts every TCP connection and hands its file descriptor to one worker over a
Unix SOCK_SEQPACKET socket (SCM_RIGHTS). This file is a reference for writing workers in
other languages: it speaks the whole protocol of docs/protocol.md and checks everything the
master sends. Read it top to bottom:

  1. find the channel (fd 3) and the settings in the environment;
  2. send READY once initialised;
  3. receive CONNECTIONS frames, take ownership of their fds, acknowledge each batch with a
     STATUS frame (in the kernel baseline modes a LISTENERS frame comes instead, once, and
     the worker accepts on those sockets itself);
  4. serve each connection on its own thread (HTTP/1.1 "hola, mundo", like the embedded
     demo) and send STATUS when one finishes;
  5. send STATUS at least every HANDOFF_HEARTBEAT_MS;
  5b. messages (MESSAGE frames, JSON payloads): this worker says hello to every other
     worker once it is ready (relayed by the master), keeps what it hears, and answers
     `GET /messages` with it;
  6. on EOF on the channel or SIGTERM: take no more, hand each idle keep-alive connection
     back to the master at its request boundary (HANDBACK, with the bytes already read:
     the master gives it to another worker, so the client's next request is answered),
     let the connections finish (at most HANDOFF_DRAIN_TIMEOUT_MS), send a last STATUS
     and exit 0.

If the master breaks the protocol the worker says so on stderr and exits with status 2.
"""

import array
import errno
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time

# --- The wire format (docs/protocol.md) -----------------------------------------------------

VERSION = 1
KIND_CONNECTIONS = 1  # master -> worker: n connections, n fds attached
KIND_READY = 2  # worker -> master: initialised, send connections
KIND_STATUS = 3  # worker -> master: acknowledgement, load report, heartbeat
KIND_LISTENERS = 4  # master -> worker, kernel baseline modes only: n listening sockets
KIND_DRAINING = 5  # worker -> master: draining on its own; final count of what it received
KIND_REFUSED = 6  # worker -> master: out of fds; the last `count` connections go back
KIND_MESSAGE = 8  # either way: a message (envelope + payload), no fds
KIND_LOADS = 9  # master -> worker, kernel-least only: the load array (not mapped here)
KIND_HANDBACK = 12  # either way: one connection (one fd) and the bytes already read from it

# version u8, kind u8, count u16, body_len u32; all little-endian.
HEADER = struct.Struct("<BBHI")
# id u64, listener u16, family u8, reserved u8, port u16, reserved u16, address 16 bytes.
ENTRY = struct.Struct("<QHBBHH16s")
# received_total u64, closed_total u64.
STATUS = struct.Struct("<QQ")

# MESSAGE envelope: route u8, encoding u8, failed u8, reserved u8, from u32, id u64.
ENVELOPE = struct.Struct("<BBBBIQ")
ROUTE_TO_MASTER, ROUTE_TO_WORKER, ROUTE_BROADCAST, ROUTE_RELAY, ROUTE_REQUEST, ROUTE_REPLY = (
    range(1, 7)
)
ENCODING_JSON = 2
FROM_MASTER = 0xFFFFFFFF
MAX_PAYLOAD = 64 * 1024

MAX_FDS = 253  # SCM_MAX_FD: the most fds one message can carry
# The largest frame is a message with the largest payload (a full CONNECTIONS is 8,104).
MAX_FRAME_LEN = HEADER.size + ENVELOPE.size + MAX_PAYLOAD
# The most bytes a HANDBACK carries after its entry: what fits the largest frame.
MAX_HANDBACK_BYTES = MAX_FRAME_LEN - HEADER.size - 32
FD_SIZE = array.array("i").itemsize  # a C int

FAMILY_UNIX, FAMILY_IPV4, FAMILY_IPV6 = 0, 4, 6

# --- The demo service -----------------------------------------------------------------------

BODY = b"hola, mundo\n"
MAX_HEAD = 64 * 1024  # request line + headers
IDLE_TIMEOUT = 60.0  # seconds a keep-alive connection may wait for its next request
IO_TIMEOUT = 30.0  # seconds a read or write may stall in the middle of a request

PID = os.getpid()


class ProtocolError(Exception):
    """The master sent something the protocol does not allow."""


def log(message):
    slot = os.environ.get("HANDOFF_WORKER", "?")
    print(f"worker.py[{PID}] slot {slot}: {message}", file=sys.stderr, flush=True)


def env_ms(name, default_ms):
    """A millisecond setting from the environment, in seconds."""
    try:
        return int(os.environ[name]) / 1000
    except (KeyError, ValueError):
        return default_ms / 1000


# --- Drain: one pipe that becomes readable forever ------------------------------------------


class Drain:
    """The worker's "stop taking work" signal, usable from a signal handler.

    Draining starts when the master closes the channel, on SIGTERM, or when the master is
    gone. It is a pipe with one byte written into it and never read: every thread can poll()
    it next to its own socket, and writing it takes no lock (so a signal handler may do it).
    """

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.started = False
        self.reason = None

    def start(self, reason):
        if self.reason is None:
            self.reason = reason
        self.started = True  # plain assignments: safe in a signal handler
        try:
            os.write(self.write_fd, b"!")
        except BlockingIOError:
            pass  # already full of "!": already draining


# --- The channel: frames, acknowledgements and load reports ---------------------------------


class Channel:
    """The worker's end of the channel, and the two counters it reports.

    One lock covers the counters and every send, so reports leave in the order they were
    taken and neither total ever goes down (the master kills a worker whose totals shrink).
    """

    def __init__(self, sock, drain):
        self.sock = sock
        self.drain = drain
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)  # notified when `active` drops to 0
        self.received_total = 0  # connections taken from the channel
        self.closed_total = 0  # connections finished
        self.active = 0  # received_total - closed_total
        self.heard = []  # the last messages received: (sender, value)
        # Whether draining connections may be handed back, once decided: after the end of
        # the channel (the master drains us), or after our DRAINING frame (SIGTERM); not
        # when the master is gone.
        self.handback_decided = threading.Event()
        self.handback_allowed = False

    def _send(self, frame):
        """Sends one frame (one datagram) with no fds. Call with the lock held."""
        try:
            sent = self.sock.send(frame)
        except OSError as e:  # EPIPE, ECONNRESET: the master is gone
            self.drain.start(f"sending to the master failed ({e})")
            return
        if sent != len(frame):  # SOCK_SEQPACKET sends a datagram whole or not at all
            raise RuntimeError(f"short send on the channel: {sent} of {len(frame)} bytes")

    def send_message(self, route, value, request_id=0):
        """Sends `value` as JSON on `route` (to the master, or relayed to every worker)."""
        payload = json.dumps(value).encode()
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"a {len(payload)}-byte message is over {MAX_PAYLOAD} bytes")
        body = ENVELOPE.pack(route, ENCODING_JSON, 0, 0, 0, request_id) + payload
        with self.lock:
            self._send(HEADER.pack(VERSION, KIND_MESSAGE, 0, len(body)) + body)

    def send_ready(self):
        with self.lock:
            self._send(HEADER.pack(VERSION, KIND_READY, 0, 0))

    def send_status(self):
        """The acknowledgement, the load report and the heartbeat are all this frame."""
        with self.lock:
            self._send(self._status_frame())

    def send_draining(self):
        """Tells the master this worker drains on its own (SIGTERM): it leaves its slot at
        once, a replacement starts, and what was not acknowledged goes to other workers.
        Send it only once nothing more will be received."""
        with self.lock:
            self._send(self._status_frame(KIND_DRAINING))

    def _status_frame(self, kind=KIND_STATUS):
        body = STATUS.pack(self.received_total, self.closed_total)
        return HEADER.pack(VERSION, kind, 0, len(body)) + body

    def received(self, count, refused=0):
        """Counts a batch as ours and acknowledges it: the master then closes its copies.
        With `refused` > 0 (our fd table was full: the kernel dropped the last fds of the
        frame), a REFUSED frame gives those back to the master, which hands them to another
        worker."""
        with self.lock:
            self.received_total += count
            self.active += count
            if refused:
                body = STATUS.pack(self.received_total, self.closed_total)
                self._send(HEADER.pack(VERSION, KIND_REFUSED, refused, len(body)) + body)
            else:
                self._send(self._status_frame())

    def finished(self):
        """Counts one connection finished and reports it (the master balances on this)."""
        with self.lock:
            self.closed_total += 1
            self.active -= 1
            if self.active == 0:
                self.idle.notify_all()
            self._send(self._status_frame())

    def allow_handbacks(self, allowed):
        self.handback_allowed = allowed
        self.handback_decided.set()

    def may_hand_back(self):
        """Whether connections may go back to the master (waits for the decision)."""
        return self.handback_decided.wait(IO_TIMEOUT) and self.handback_allowed

    def hand_back(self, conn, entry, already_read):
        """Hands `conn` back to the master (a draining worker, at a request boundary) with
        the bytes read from it and not used; True if it went, and it then counts as
        finished here. False: serve it on and close it after its next response."""
        if entry is None:
            return False  # accepted here (kernel modes): the master never had it
        if not self.may_hand_back():
            return False
        if len(already_read) > MAX_HANDBACK_BYTES:
            return False
        body = entry + already_read
        frame = HEADER.pack(VERSION, KIND_HANDBACK, 1, len(body)) + body
        fds = array.array("i", [conn.fileno()])
        with self.lock:
            try:
                self.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            except OSError as e:
                self.drain.start(f"sending to the master failed ({e})")
                return False
        return True

    def wait_idle(self, timeout):
        """Waits until no connection is active; False if `timeout` seconds passed first."""
        with self.lock:
            return self.idle.wait_for(lambda: self.active == 0, timeout)

    def recv_frame(self):
        """Receives one frame from the master and checks it.

        Returns None at the end of the channel (the master's word to drain), otherwise
        (kind, body, fds) of a CONNECTIONS or LISTENERS frame; a CONNECTIONS frame may
        bring fewer fds than entries when this process is out of fds (MSG_CTRUNC). Every fd
        that arrived is closed before a ProtocolError leaves, so none leaks.
        """
        ancillary_room = socket.CMSG_SPACE(MAX_FDS * FD_SIZE)
        # One byte more than the largest frame, so an oversized one shows as MSG_TRUNC.
        # MSG_CMSG_CLOEXEC: the fds must not leak into programs this worker might start.
        data, ancillary, flags, _ = self.sock.recvmsg(
            MAX_FRAME_LEN + 1, ancillary_room, socket.MSG_CMSG_CLOEXEC
        )
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % FD_SIZE])
        fds = list(fds)
        try:
            if not data and not fds:
                return None  # EOF: the master closed its sending side
            if flags & socket.MSG_TRUNC or len(data) > MAX_FRAME_LEN:
                if len(data) > 1 and data[1] == KIND_MESSAGE and not fds:
                    return KIND_MESSAGE, None, []  # one message too long: dropped
                raise ProtocolError(f"frame longer than the {MAX_FRAME_LEN}-byte limit")
            kind, count, body = decode(data)
            if kind == KIND_MESSAGE and not fds:
                return kind, body, fds
            if kind == KIND_LOADS and count == len(fds) == 1:
                # kernel-least's load array: a worker that does not map it is reconciled
                # by the master from its STATUS frames (docs/protocol.md, LOADS).
                os.close(fds[0])
                return kind, body, []
            if kind not in (KIND_CONNECTIONS, KIND_LISTENERS, KIND_HANDBACK):
                raise ProtocolError(f"unexpected frame kind {kind} from the master")
            if flags & socket.MSG_CTRUNC:
                # Our fd table is full: the kernel installed the first fds and dropped the
                # rest. Connections are refused (the caller says so); listeners cannot be.
                if kind == KIND_LISTENERS or len(fds) >= count:
                    raise ProtocolError("fds were truncated in transit (MSG_CTRUNC)")
            elif count != len(fds):
                raise ProtocolError(f"frame declares {count} fds, {len(fds)} arrived")
            return kind, body, fds
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            raise


def decode(data):
    """Checks a datagram's header and shape; returns (kind, count, body)."""
    if len(data) < HEADER.size:
        raise ProtocolError(f"frame of {len(data)} bytes is shorter than the 8-byte header")
    version, kind, count, body_len = HEADER.unpack_from(data)
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    body = data[HEADER.size :]
    if body_len != len(body):
        raise ProtocolError(f"header declares a {body_len}-byte body, {len(body)} bytes arrived")
    if kind in (KIND_CONNECTIONS, KIND_LISTENERS):
        if not 1 <= count <= MAX_FDS or len(body) != count * ENTRY.size:
            raise ProtocolError(
                f"kind {kind} frame with count {count} and a {len(body)}-byte body"
            )
    elif kind == KIND_MESSAGE:
        if count != 0:
            raise ProtocolError(f"message frame with count {count}")
    elif kind == KIND_HANDBACK:
        # One connection that another worker handed back, and the bytes it had read.
        if count != 1 or not ENTRY.size <= len(body) <= ENTRY.size + MAX_HANDBACK_BYTES:
            raise ProtocolError(f"handback frame with count {count} and a {len(body)}-byte body")
    elif kind == KIND_LOADS:
        if count != 1 or len(body) != 8:
            raise ProtocolError(f"loads frame with count {count} and a {len(body)}-byte body")
    elif kind in (KIND_READY, KIND_STATUS, KIND_DRAINING, KIND_REFUSED):
        pass  # valid frames, but only a worker sends them (refused by the caller)
    else:
        raise ProtocolError(f"unknown frame kind {kind}")
    return kind, count, body


def decode_entries(body):
    """The entries of a CONNECTIONS or LISTENERS body: (id, listener, address) each."""
    entries = []
    for offset in range(0, len(body), ENTRY.size):
        conn_id, listener, family, _, port, _, address = ENTRY.unpack_from(body, offset)
        if family == FAMILY_UNIX:
            peer = "unix"
        elif family == FAMILY_IPV4:
            peer = f"{socket.inet_ntop(socket.AF_INET, address[:4])}:{port}"
        elif family == FAMILY_IPV6:
            peer = f"[{socket.inet_ntop(socket.AF_INET6, address)}]:{port}"
        else:
            raise ProtocolError(f"connection entry with unknown address family {family}")
        entries.append((conn_id, listener, peer))
    return entries


# --- HTTP/1.1: one thread per connection ----------------------------------------------------


def serve_connection(conn, channel, drain, entry, already_read):
    """Answers every request on `conn` until the client or the drain ends it."""
    handed_back = False
    try:
        # The fd arrived non-blocking and shares its file status flags with the master's copy:
        # leave it so. A timeout makes Python poll internally, so sendall() still works.
        conn.settimeout(IO_TIMEOUT)
        handed_back = http_session(conn, drain, channel, entry, already_read) == HANDED_BACK
    except OSError:
        pass  # the client went away, or stalled past IO_TIMEOUT
    finally:
        # The master may still hold a copy of this socket (until it reads our acknowledgement),
        # so close() alone might not end the TCP connection: shut the write side down first
        # and the client sees FIN now. Not when it was handed back: the master holds it for
        # another worker, and a shutdown would end it for that one too.
        if not handed_back:
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # ENOTCONN: the client is already gone
        conn.close()
        channel.finished()


HANDED_BACK = "handed back"


def wait_readable(conn, drain, timeout):
    """Waits for `conn` to have data. Returns False on timeout, or if `drain` (an fd) fires."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    if drain is not None:
        poller.register(drain, select.POLLIN)
    events = poller.poll(timeout * 1000)
    return any(fd == conn.fileno() for fd, _ in events)


def http_session(conn, drain, channel, entry, pending=b""):
    """Serves requests; returns HANDED_BACK if the connection went back to the master."""
    # `pending`: bytes received and not yet used (pipelined requests stay here; a connection
    # handed back by another worker arrives with the bytes that worker had read).
    answered = 0
    hand_back = True  # until a hand-back fails
    while True:
        # Read a request head. Between requests a keep-alive connection waits, and a drain
        # hands it back to the master with what it read so far, for another worker; where
        # that fails, an idle one closes. A new connection gets its first request answered
        # even while draining (handed back before it, it would be lost if the master is
        # stopping too).
        while (end := pending.find(b"\r\n\r\n")) < 0:
            if len(pending) > MAX_HEAD:
                return respond(conn, 431, keep_alive=False)
            if drain.started and hand_back and answered > 0:
                if channel.hand_back(conn, entry, pending):
                    return HANDED_BACK
                hand_back = False
            idle = not pending and answered > 0
            if drain.started and idle:
                return
            watch = drain.read_fd if answered > 0 and not drain.started else None
            if not wait_readable(conn, watch, IDLE_TIMEOUT if idle else IO_TIMEOUT):
                if drain.started and answered > 0:
                    continue  # woken by the drain: hand back, or close if idle
                return
            data = conn.recv(65536)
            if not data:
                return
            pending += data
        head, pending = pending[:end].decode("latin-1"), pending[end + 4 :]
        request = parse_head(head)
        if request is None:
            return respond(conn, 400, keep_alive=False)
        method, path, version, headers = request

        connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        if version == "HTTP/1.1":
            keep_alive = "close" not in connection
        else:  # HTTP/1.0 closes unless asked otherwise
            keep_alive = "keep-alive" in connection
        if "transfer-encoding" in headers:
            keep_alive = False  # a chunked body is not read here: answer, then close
        else:
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                return respond(conn, 400, keep_alive=False)
            if length < 0:
                return respond(conn, 400, keep_alive=False)
            # Read and discard the body, so the next request starts where it should.
            while len(pending) < length:
                data = conn.recv(65536)
                if not data:
                    return
                pending += data
            pending = pending[length:]
        # Draining, the connection stays open only if it can go back to the master after
        # this response; otherwise the response says it closes.
        keep_alive = keep_alive and (not drain.started or (hand_back and channel.may_hand_back()))
        body = BODY
        if path == "/messages":
            with channel.lock:
                body = (json.dumps({"heard": channel.heard}) + "\n").encode()
        respond(conn, 200, keep_alive, head_only=method == "HEAD", version=version, body=body)
        answered += 1
        if not keep_alive:
            return


def parse_head(head):
    """(method, path, version, headers with lower-case names) or None if malformed."""
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        return None
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], parts[2], headers


REASONS = {200: "OK", 400: "Bad Request", 431: "Request Header Fields Too Large"}


def respond(conn, status, keep_alive, head_only=False, version="HTTP/1.1", body=BODY):
    body = body if status == 200 else b""
    lines = [
        f"HTTP/1.1 {status} {REASONS[status]}",
        "content-type: text/plain",
        f"content-length: {len(body)}",
        f"x-worker-pid: {PID}",
    ]
    if not keep_alive:
        lines.append("connection: close")
    elif version == "HTTP/1.0":
        lines.append("connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    conn.sendall(head if head_only else head + body)


# --- The worker's main loop -----------------------------------------------------------------


def heartbeat(channel, interval):
    """Reports at least every HANDOFF_HEARTBEAT_MS, so the master knows this worker is alive."""
    while True:
        channel.send_status()
        time.sleep(interval)


def take_message(channel, body):
    """Keeps a message from the master or another worker; a malformed one is dropped."""
    if body is None or len(body) < ENVELOPE.size:
        return log("dropping a malformed or oversized message")
    route, encoding, failed, _, sender, _ = ENVELOPE.unpack_from(body)
    if route not in (ROUTE_TO_WORKER, ROUTE_BROADCAST, ROUTE_RELAY, ROUTE_REPLY):
        return log(f"dropping a message on route {route}")
    payload = body[ENVELOPE.size :]
    if failed:
        return log(f"the master refused a request: {payload.decode(errors='replace')}")
    if encoding != ENCODING_JSON:
        return log(f"dropping a message in encoding {encoding}: this worker reads JSON")
    try:
        value = json.loads(payload)
    except ValueError:
        return log("dropping a message that is not JSON")
    with channel.lock:
        channel.heard = (channel.heard + [("master" if sender == FROM_MASTER else sender, value)])[-100:]


def take_connections(channel, drain, body, fds, already_read=b""):
    """Owns the fds of one CONNECTIONS frame (or HANDBACK, whose one connection brings
    `already_read`), acknowledges them, starts a thread for each."""
    try:
        entries = decode_entries(body)
    except ProtocolError:
        for fd in fds:
            os.close(fd)
        raise
    conns = []
    for fd in fds:
        # socket.socket(fileno=...) takes ownership of the fd and finds its family and type.
        try:
            conns.append(socket.socket(fileno=fd))
        except OSError as e:
            log(f"dropping a connection that is not a usable socket: {e}")
            os.close(fd)
            conns.append(None)
    refused = len(entries) - len(fds)
    if refused:
        log(f"out of file descriptors: refusing {refused} connection(s)")
    channel.received(len(conns), refused)  # the acknowledgement: STATUS (or REFUSED)
    for index, ((conn_id, _listener, _peer), conn) in enumerate(zip(entries, conns)):
        if conn is None:
            channel.finished()  # counted as received, so count it as finished too
            continue
        # Its entry goes back to the master as it came, should the connection be handed back.
        entry = body[index * ENTRY.size : (index + 1) * ENTRY.size]
        start_serving(conn, channel, drain, f"connection-{conn_id}", entry, already_read)


def start_serving(conn, channel, drain, name, entry=None, already_read=b""):
    thread = threading.Thread(
        target=serve_connection,
        args=(conn, channel, drain, entry, already_read),
        name=name,
        daemon=True,
    )
    thread.start()


def take_listeners(channel, drain, body, fds):
    """Kernel baseline modes only (--strategy kernel-shared|kernel-reuseport): the master
    does not accept, it sends listening sockets once and the worker accepts on them itself.
    Each accepted connection counts in received_total as if the master had sent it."""
    try:
        entries = decode_entries(body)
    except ProtocolError:
        for fd in fds:
            os.close(fd)
        raise
    for (_, index, local), fd in zip(entries, fds):
        listener = socket.socket(fileno=fd)
        # In kernel-shared mode the master and every worker share this socket and its
        # O_NONBLOCK flag: keep it non-blocking (another worker may win each connection).
        listener.setblocking(False)
        log(f"accepting on listener {index} ({local}) myself")
        threading.Thread(
            target=accept_loop, args=(listener, channel, drain), name=f"listener-{index}",
            daemon=True,
        ).start()


def accept_loop(listener, channel, drain):
    """Accepts until the drain starts; then closes this worker's copy of the listener."""
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    poller.register(drain.read_fd, select.POLLIN)
    accepted = 0
    while not drain.started:
        if drain.read_fd in dict(poller.poll()):
            break
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            continue  # another process took it
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.01)  # out of fds or memory: do not spin
            continue  # ECONNABORTED and the like: that connection is gone
        accepted += 1
        channel.received(1)
        start_serving(conn, channel, drain, name=f"accepted-{accepted}")
    listener.close()


def open_channel():
    """The channel the master left at HANDOFF_FD (always 3), checked and made ours."""
    try:
        fd = int(os.environ["HANDOFF_FD"])
    except (KeyError, ValueError):
        raise SystemExit("worker.py: HANDOFF_FD is not set: start me with `handoff run -- ...`")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise SystemExit(f"worker.py: fd {fd} is not a socket: {e}")
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        raise SystemExit(f"worker.py: fd {fd} is not an AF_UNIX SOCK_SEQPACKET socket")
    sock.set_inheritable(False)  # programs this worker starts must not hold the channel
    # It arrives non-blocking, but socket(fileno=...) believes it blocks; say what we mean.
    # Blocking sends are simplest from many threads; the main loop poll()s before receiving.
    sock.setblocking(True)
    return sock


def main():
    sock = open_channel()
    heartbeat_interval = env_ms("HANDOFF_HEARTBEAT_MS", 1000)
    drain_timeout = env_ms("HANDOFF_DRAIN_TIMEOUT_MS", 30000)
    drain = Drain()
    channel = Channel(sock, drain)
    # SIGTERM (also what the kernel sends if the master dies) means drain, like EOF.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: drain.start("SIGTERM"))

    # Initialisation is done: only now may the master send connections.
    channel.send_ready()
    # Every other worker hears of this one (the master relays the message to each).
    channel.send_message(ROUTE_RELAY, {"hello": PID})
    threading.Thread(
        target=heartbeat, args=(channel, heartbeat_interval), name="heartbeat", daemon=True
    ).start()

    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(drain.read_fd, select.POLLIN)
    try:
        while not drain.started:
            events = dict(poller.poll())
            if drain.read_fd in events:
                break
            try:
                frame = channel.recv_frame()
            except OSError as e:  # ECONNRESET: the master is gone
                drain.start(f"receiving from the master failed ({e})")
                break
            if frame is None:
                drain.start("the master closed the channel")
                break
            kind, body, fds = frame
            if kind == KIND_MESSAGE:
                take_message(channel, body)
            elif kind == KIND_CONNECTIONS:
                take_connections(channel, drain, body, fds)
            elif kind == KIND_HANDBACK:
                take_connections(channel, drain, body[: ENTRY.size], fds, body[ENTRY.size :])
            elif kind == KIND_LOADS:
                pass
            else:
                take_listeners(channel, drain, body, fds)
    except ProtocolError as e:
        log(f"protocol violation by the master: {e}")
        return 2
    # Idle keep-alive connections close now, busy ones after their response.
    drain.start("the main loop ended")
    log(f"{drain.reason}; draining")
    if drain.reason == "SIGTERM":
        # Our own decision, not the master's: say so, with the final count of what we took.
        channel.send_draining()
    # The master takes connections back from a worker it knows is draining: after the end of
    # the channel or our DRAINING frame; it cannot when it is gone.
    channel.allow_handbacks(
        drain.reason in ("SIGTERM", "the master closed the channel")
    )

    if not channel.wait_idle(drain_timeout):
        log(f"drain timed out; {channel.active} connection(s) still open")
    channel.send_status()  # the last report
    log("drained; exiting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
