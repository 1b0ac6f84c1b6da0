"""The request loop: read a frame, run its handler, send one reply.

Theory of operation: QEMU sends one request at a time and waits for its
reply, so the loop is synchronous and single-threaded. Frames arrive into
one reused buffer, normally with a single recv. The frame header gives the
payload size, capped before anything is read, so a hostile size cannot make
the helper allocate or wait for more than one maximal frame.

Every request gets exactly one reply of the kind its type calls for, even
when the payload is malformed or the handler fails. That keeps the two
sides in step: QEMU reads an fd reply for OPEN and CREATE and a frame for
everything else, so a reply of the wrong kind would desynchronise the
stream. Only a frame whose size exceeds the protocol's maximum ends the
connection, since the helper cannot tell where the next frame would start.

The plain recv never accepts descriptors: if the peer attaches some with
SCM_RIGHTS, the kernel discards them because no control buffer is given.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import termios
from typing import NoReturn

from . import longpaths, protocol
from .operations import Operations, Result
from .protocol import DecodeError

logger = logging.getLogger(__name__)

# Malformed requests are logged as warnings up to this count, then only at
# DEBUG, so a hostile peer cannot flood the log.
MAX_LOGGED_MALFORMED = 10

_BUFFER_SIZE = protocol.HEADER_SIZE + protocol.MAX_PAYLOAD

# SIOCOUTQ: bytes the peer has not yet read from a socket's send queue.
SIOCOUTQ = termios.TIOCOUTQ

_unpack_header = protocol.HEADER.unpack_from
_SUCCESS_STATUS = protocol.encode_status(0)
_FD_SENT = [protocol.encode_fd_status(protocol.FD_VALID)]
_INT = struct.Struct("=i")
_NOTHING_QUEUED = bytes(4)


def _name(kind: int) -> str:
    return protocol.TYPE_NAMES.get(kind, str(kind))


class PeerClosed(Exception):
    """The connection ended: the peer closed it, or it can no longer be used.

    `clean` is true only for an orderly close between two frames.
    """

    def __init__(self, reason: str, clean: bool = False):
        super().__init__(reason)
        self.clean = clean


class Server:
    """Serves one connected peer until it disconnects."""

    def __init__(self, sock: socket.socket, operations: Operations):
        self.sock = sock
        self.operations = operations
        self.buffer = bytearray(_BUFFER_SIZE)
        self.view = memoryview(self.buffer)
        self.filled = 0
        self.malformed = 0
        self.requests = 0
        self.handlers = operations.handlers
        self._receive = sock.recv_into
        self.fileno = sock.fileno()
        # The log level is fixed at start, so it is read once here, not per request.
        self.debug = logger.isEnabledFor(logging.DEBUG)

    def serve(self) -> bool:
        """Serve requests until the connection ends.

        Return True if the peer closed it cleanly, False if it broke or the
        peer violated the protocol.
        """
        try:
            self._serve_requests()
        except PeerClosed as closed:
            log = logger.info if closed.clean else logger.error
            log(
                "connection closed: %s (%d requests, %d malformed)",
                closed,
                self.requests,
                self.malformed,
            )
            return closed.clean

    def _serve_requests(self) -> NoReturn:
        """Receive, run and reply to requests until the connection ends.

        This loop is the helper's hottest code, so the usual path (one whole
        frame per receive, then a handler and one send) is written out here
        with local names rather than split into small methods. That saved
        0.3 to 0.6 us of CPU per request, 2 to 10% (bench/protocol.py, same
        CPU, against the same code with one method per step). Partial
        frames, malformed requests and errors leave it for methods.
        """
        payload: bytes | bytearray
        receive = self._receive
        send = self.sock.sendall
        view = self.view
        buffer = self.buffer
        decoders = protocol.DECODERS
        handlers = self.handlers
        debug = self.debug
        while True:
            # Receive. QEMU waits for each reply, so one receive into the
            # empty buffer usually brings exactly one whole frame.
            if self.filled:
                kind, payload = self._read_frame()
            else:
                try:
                    received = receive(view)
                except OSError as err:
                    raise PeerClosed(f"receive failed: {err.strerror}") from err
                if received == 0:
                    raise PeerClosed("peer disconnected", clean=True)
                whole = False
                if received >= protocol.HEADER_SIZE:
                    kind, size = _unpack_header(buffer)
                    whole = received == protocol.HEADER_SIZE + size
                if whole:
                    payload = buffer[protocol.HEADER_SIZE : received]
                else:
                    self.filled = received
                    kind, payload = self._read_frame()
            self.requests += 1

            # Decode.
            decode = decoders.get(kind)
            if decode is None:
                self._log_malformed(kind, f"unknown request type {kind}")
                self._reply_error(kind, errno.EOPNOTSUPP)
                continue
            try:
                request = decode(payload)
            except DecodeError as err:
                self._log_malformed(kind, str(err))
                self._reply_error(kind, errno.EINVAL)
                continue

            # Run. An OSError's errno goes back to the peer unchanged.
            result: Result
            try:
                if len(payload) < longpaths.PATH_MAX:
                    result = handlers[kind](request)
                else:
                    result = self.operations.call_long(kind, request)
            except OSError as err:
                code = err.errno or errno.EIO
                if debug:
                    logger.debug(
                        "%s %r: %s", _name(kind), request, errno.errorcode.get(code)
                    )
                self._reply_error(kind, code)
                continue
            except Exception:
                logger.exception(
                    "internal error in %s %r; replying EIO", _name(kind), request
                )
                self._reply_error(kind, errno.EIO)
                continue

            # Reply.
            if debug:
                logger.debug("%s %r: ok", _name(kind), request)
            if kind in protocol.FD_REPLY_TYPES:
                assert isinstance(result, int)
                self._send_fd(result)
                continue
            if result is None:
                reply = _SUCCESS_STATUS
            else:
                assert isinstance(result, bytes)
                reply = protocol.encode_data(result)
            try:
                send(reply)
            except OSError as err:
                raise PeerClosed(f"send failed: {err.strerror}") from err

    def _receive_some(self) -> None:
        """Receive what has arrived after the bytes already buffered."""
        try:
            received = self._receive(self.view[self.filled :])
        except OSError as err:
            raise PeerClosed(f"receive failed: {err.strerror}") from err
        if received == 0:
            if self.filled:
                raise PeerClosed("peer disconnected in the middle of a frame")
            raise PeerClosed("peer disconnected", clean=True)
        self.filled += received

    def _fill(self, size: int) -> None:
        while self.filled < size:
            self._receive_some()

    def _read_frame(self) -> tuple[int, bytes]:
        """Return the next frame when the buffer contains less or more than one."""
        self._fill(protocol.HEADER_SIZE)
        try:
            kind, size = protocol.decode_header(self.view)
        except DecodeError as err:
            raise PeerClosed(f"invalid frame header: {err}") from err
        end = protocol.HEADER_SIZE + size
        self._fill(end)
        payload = bytes(self.view[protocol.HEADER_SIZE : end])
        # A peer that sends ahead leaves bytes for the next frame.
        leftover = self.filled - end
        if leftover:
            self.buffer[:leftover] = self.buffer[end : self.filled]
        self.filled = leftover
        return kind, payload

    def _log_malformed(self, kind: int, reason: str) -> None:
        self.malformed += 1
        if self.malformed <= MAX_LOGGED_MALFORMED:
            logger.warning("malformed %s request: %s", _name(kind), reason)
            if self.malformed == MAX_LOGGED_MALFORMED:
                logger.warning("further malformed requests are logged at DEBUG")
        else:
            logger.debug("malformed %s request: %s", _name(kind), reason)

    def _reply_error(self, kind: int, code: int) -> None:
        if kind in protocol.FD_REPLY_TYPES:
            self._send(protocol.encode_fd_status(-code))
        else:
            self._send(protocol.encode_status(-code))

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as err:
            raise PeerClosed(f"send failed: {err.strerror}") from err

    def _send_fd(self, fd: int) -> None:
        try:
            code = self._fd_rejected()
            if code == 0:
                code = self._sendmsg_fd(fd)
        finally:
            os.close(fd)
        if code:
            self._send(protocol.encode_fd_status(-code))

    def _fd_rejected(self) -> int:
        """Return ETOOMANYREFS if the peer has not read an earlier reply.

        Descriptors in flight count against the sending user, root, which
        every helper on the host shares, up to the sender's RLIMIT_NOFILE.
        QEMU reads each reply before its next request, so a queue that is
        not empty means a peer that pipelines OPENs to hoard descriptors,
        which would make sendmsg fail for all helpers. It gets an errno
        instead, so it keeps at most one descriptor in flight.
        """
        if fcntl.ioctl(self.fileno, SIOCOUTQ, _NOTHING_QUEUED) == _NOTHING_QUEUED:
            return 0
        logger.debug("peer has unread replies; not sending a descriptor")
        return errno.ETOOMANYREFS

    def _sendmsg_fd(self, fd: int) -> int:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _INT.pack(fd))]
        try:
            self.sock.sendmsg(_FD_SENT, rights)
        except (BrokenPipeError, ConnectionResetError) as err:
            raise PeerClosed(f"sending a descriptor failed: {err.strerror}") from err
        except OSError as err:
            # A failed sendmsg queues nothing, so an errno reply keeps the
            # stream in step. ETOOMANYREFS is the usual cause.
            logger.warning("sending a descriptor failed: %s; replying with it", err)
            return err.errno or errno.EIO
        return 0
