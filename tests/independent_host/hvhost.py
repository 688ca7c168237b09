#!/usr/bin/env python3
"""An independent Hyper-V host for the shm transport (shared/specs/shm-transport.md).

Written from the spec and the public Linux/OpenVMM headers only, without reading the
hvisd sources, so that a guest that talks to it proves interoperability rather than
agreement between two halves written together.

It offers the heartbeat, shutdown and timesync integration components on ROOT, plays
the host side of each VMBus ring over mmap, negotiates IC versions the way Hyper-V
does (the host speaks first), exchanges heartbeats, and prints a JSON summary.
Exit status: 0 all checks passed, 1 a check failed, 2 bad usage or setup,
3 deliberate abrupt death (--die-mid-packet).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import select
import socket
import struct
import sys
import threading
import time
import uuid

CONTROL_PAGE = 4096
WRITE_INDEX, READ_INDEX, INTERRUPT_MASK, PENDING_SEND_SZ, FEATURE_BITS = 0, 4, 8, 12, 64

VM_PKT_DATA_INBAND = 6
DESCRIPTOR = struct.Struct("<HHHHQ")  # type, offset8, len8, flags, trans_id
TRAILER = struct.Struct("<Q")
PIPE_HDR = struct.Struct("<II")  # vmbuspipe_hdr: flags, msgsize
# icmsg_hdr (packed, 20 bytes): icverframe{major,minor}, icmsgtype, icvermsg{major,minor},
# icmsgsize, status, ictransaction_id, icflags, reserved[2]
ICMSG_HDR = struct.Struct("<HHHHHHIBB2s")
NEGOTIATE = struct.Struct("<HHI")  # icframe_vercnt, icmsg_vercnt, reserved
VERSION = struct.Struct("<HH")
HEARTBEAT_DATA = struct.Struct("<Q32s")  # heartbeat_msg_data: seq_num, reserved[8] (u32)

PIPE_PACKET_TYPE_DATA = 1
ICMSGTYPE_NEGOTIATE, ICMSGTYPE_HEARTBEAT = 0, 1
ICFLAG_TRANSACTION, ICFLAG_REQUEST, ICFLAG_RESPONSE = 1, 2, 4
IC_REQUEST_FLAGS = ICFLAG_TRANSACTION | ICFLAG_REQUEST
IC_RESPONSE_FLAGS = ICFLAG_TRANSACTION | ICFLAG_RESPONSE

FRAMEWORK_VERSIONS = [(1, 0), (3, 0)]
IC_SERVICES = [
    # name, class_id, message versions the host offers (oldest first, like OpenVMM)
    ("heartbeat", "57164f39-9115-4e78-ab55-382f3bd5422d", [(1, 0), (3, 0)]),
    ("shutdown", "0e0b6031-5213-4934-818b-38d90ced39db", [(1, 0), (3, 0), (3, 1), (3, 2)]),
    ("timesync", "9527e630-d0ae-497b-adce-e80ab0175caf", [(1, 0), (3, 0), (4, 0)]),
]

# The largest IC message a host accepts (OpenVMM's MAX_MESSAGE_SIZE); anything the guest
# claims beyond this is not read.
MAX_IC_MESSAGE = 13312
TRANS_ID_BASE = 0x5A5A_0000_0000_0000
MISSED_SIGNAL_SLICE = 5.0  # seconds; far beyond any scheduling delay between publish and signal


_FENCE = threading.Lock()


def full_barrier() -> None:
    """Orders our earlier stores to the rings before our later loads from them.

    Publishing an index and then looking at the peer's index is a Dekker pattern: on x86 the
    store can sit in the store buffer past the load, and both sides then miss each other's
    update (Linux uses virt_mb() at these points). An uncontended lock acquire is a locked
    read-modify-write instruction, which is a full fence.
    """
    _FENCE.acquire()
    _FENCE.release()


class WriterQuirks:
    """How the host shapes the packets it writes (all legal per spec, some unusual)."""

    offset8 = 2  # descriptor offset8; > 2 puts zero bytes between descriptor and payload
    sloppy = False  # stale padding bytes and a trailer other than start<<32
    packet_flags = 0  # VMBus descriptor flags (1 = completion requested)
    heartbeat_size = HEARTBEAT_DATA.size  # heartbeat body bytes; OpenVMM's host sends 16


WRITER = WriterQuirks()


class Violation(Exception):
    """The guest broke the transport or IC contract in a way that stops this channel."""


class ChannelClosed(Exception):
    """The guest closed its doorbell connection."""


def fmt_version(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


class Ring:
    """One direction's ring: a control page followed by the data area, inside the mmap."""

    def __init__(self, mm: mmap.mmap, base: int, ring_size: int):
        self.mm = mm
        self.base = base
        self.data_size = ring_size - CONTROL_PAGE

    def get(self, field: int) -> int:
        return struct.unpack_from("<I", self.mm, self.base + field)[0]

    def set(self, field: int, value: int) -> None:
        struct.pack_into("<I", self.mm, self.base + field, value)

    def read_data(self, pos: int, n: int) -> bytes:
        start = self.base + CONTROL_PAGE
        first = min(n, self.data_size - pos)
        out = self.mm[start + pos : start + pos + first]
        if first < n:
            out += self.mm[start : start + n - first]
        return out

    def write_data(self, pos: int, data: bytes) -> None:
        start = self.base + CONTROL_PAGE
        first = min(len(data), self.data_size - pos)
        self.mm[start + pos : start + pos + first] = data[:first]
        if first < len(data):
            self.mm[start : start + len(data) - first] = data[first:]


class Channel:
    """The host end of one offered IC channel."""

    def __init__(self, root: str, index: int, name: str, class_id: str, msg_versions, ring_size: int):
        self.name = name
        self.class_id = class_id
        self.msg_versions = msg_versions
        self.instance_id = str(uuid.uuid4())
        self.dir = os.path.join(root, self.instance_id)
        self.ring_size = ring_size
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.mm: mmap.mmap | None = None
        # Distinct, full-width transaction ids per channel, so an echo that drops high bits shows.
        self.next_trans_id = TRANS_ID_BASE | (index + 1) << 40 | 0x8000_0000
        self.backlog: list = []  # replies read while the writer waited for space
        self.last_rx_total = 0  # ring bytes of the last guest packet, trailer included
        self.fw = self.mv = None
        # Host-private ring state. tx = host-to-guest (we write), rx = guest-to-host (we read).
        self.tx_write = 0  # where our next packet goes; runs ahead of write_index within a batch
        self.tx_published = 0  # the write_index the guest can see
        self.tx_read_seen = 0
        self.rx_read = 0
        self.rx_write_seen = 0
        self.stats = {
            "packets_sent": 0,
            "packets_received": 0,
            "sent_across_ring_end": 0,
            "received_across_ring_end": 0,
            "tx_wraps": 0,
            "rx_wraps": 0,
            "signals_sent": 0,
            "signals_received": 0,
            "pending_send_waits": 0,
        }
        self.oddities = {
            "bad_trailer": 0,
            "nonzero_padding": 0,
            "doorbell_message_not_4_bytes": 0,
            "pipe_msgsize_exceeds_packet": 0,
        }
        self.first_bad_trailer: str | None = None
        self.first_nonzero_padding: str | None = None
        self.violations: list[str] = []
        self.result: dict = {"name": name, "class_id": class_id, "instance_id": self.instance_id}

    # ---- offer lifecycle (spec order: ring, doorbell, then offer via rename) ----

    def offer(self) -> None:
        os.mkdir(self.dir)
        ring_path = os.path.join(self.dir, "ring")
        with open(ring_path, "wb") as f:
            f.truncate(2 * self.ring_size)  # sparse zero fill: the spec asks for zeros
        fd = os.open(ring_path, os.O_RDWR)
        try:
            self.mm = mmap.mmap(fd, 2 * self.ring_size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.rx = Ring(self.mm, 0, self.ring_size)  # guest-to-host
        self.tx = Ring(self.mm, self.ring_size, self.ring_size)  # host-to-guest
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(os.path.join(self.dir, "doorbell"))
        self.listener.listen(1)
        text = (
            f"class_id={self.class_id}\n"
            f"instance_id={self.instance_id}\n"
            f"ring_size={self.ring_size}\n"
        )
        tmp = os.path.join(self.dir, ".offer.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(self.dir, "offer"))

    def accepted(self, conn: socket.socket) -> None:
        self.conn = conn
        g2h, h2g = self.rx.get(FEATURE_BITS), self.tx.get(FEATURE_BITS)
        self.result["feature_bits"] = {"guest_to_host": g2h, "host_to_guest": h2g}
        if g2h != 1 or h2g != 1:
            self.violations.append(
                f"feature_bits at connect: guest-to-host page offset 64 = {g2h:#x}, "
                f"host-to-guest page offset {self.ring_size + 64} = {h2g:#x}; spec requires 1 in both"
            )
        # We want every signal the guest owes us; a non-zero mask would let it stay silent.
        self.rx.set(INTERRUPT_MASK, 0)

    def rescind(self) -> None:
        for path in ("offer", "doorbell", "ring"):
            try:
                os.unlink(os.path.join(self.dir, path))
            except FileNotFoundError:
                pass
        for s in (self.conn, self.listener):
            if s is not None:
                s.close()
        try:
            os.rmdir(self.dir)
        except OSError:
            pass

    # ---- doorbell ----

    def signal(self) -> None:
        try:
            self.conn.send(struct.pack("<I", 1))
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ChannelClosed(f"{self.name}: doorbell send failed: {e}") from e
        self.stats["signals_sent"] += 1

    def wait_signal(self, timeout: float) -> bool:
        """Blocks until the guest rings the doorbell; returns False on timeout."""
        ready, _, _ = select.select([self.conn], [], [], timeout)
        if not ready:
            return False
        self._drain_doorbell(block_first=True)
        return True

    def _drain_doorbell(self, block_first: bool) -> None:
        flags = 0 if block_first else socket.MSG_DONTWAIT
        while True:
            try:
                msg = self.conn.recv(64, flags)
            except BlockingIOError:
                return
            except ConnectionResetError as e:
                raise ChannelClosed(f"{self.name}: doorbell reset by guest") from e
            if not msg:
                raise ChannelClosed(f"{self.name}: guest closed the doorbell connection")
            self.stats["signals_received"] += 1
            if len(msg) != 4:
                self.oddities["doorbell_message_not_4_bytes"] += 1
            flags = socket.MSG_DONTWAIT

    # ---- host-to-guest writer ----

    def _guest_read_index(self) -> int:
        """Reads the guest's read_index of the host-to-guest ring once and validates it."""
        r = self.tx.get(READ_INDEX)
        size = self.tx.data_size
        if r % 8 or r >= size:
            raise Violation(
                f"{self.name}: host-to-guest read_index {r:#x} (file offset {self.ring_size + READ_INDEX}) "
                f"is not an 8-aligned offset below {size}"
            )
        # The guest may only consume what we published: seen <= r <= write_index, in ring order.
        if (r - self.tx_read_seen) % size > (self.tx_published - self.tx_read_seen) % size:
            raise Violation(
                f"{self.name}: host-to-guest read_index moved to {r:#x}, past our write_index "
                f"{self.tx_published:#x} (previous read_index {self.tx_read_seen:#x})"
            )
        self.tx_read_seen = r
        return r

    def _tx_free(self) -> int:
        r = self._guest_read_index()
        return self.tx.data_size - (self.tx_write - r) % self.tx.data_size

    def build_packet(self, payload: bytes, trans_id: int, start: int, pkt_flags: int) -> bytes:
        header = 8 * WRITER.offset8
        body = header + len(payload)
        padded = (body + 7) & ~7
        if WRITER.sloppy:
            # What OpenVMM's writer may leave behind: stale padding, and a trailer that is not
            # start<<32. The spec says readers must not reject either.
            pad, trailer = b"\xa5" * (padded - body), 0xA5A5_A5A5_0000_0000 | start
        else:
            pad, trailer = bytes(padded - body), start << 32
        return (
            DESCRIPTOR.pack(VM_PKT_DATA_INBAND, WRITER.offset8, padded // 8, pkt_flags, trans_id)
            + bytes(header - DESCRIPTOR.size)
            + payload
            + pad
            + TRAILER.pack(trailer)
        )

    def send_packet(self, payload: bytes, pkt_flags: int | None = None, wait_timeout: float = 10.0,
                    mask_rx_while_waiting: bool = False, publish: bool = True) -> int:
        trans_id = self.next_trans_id
        self.next_trans_id += 1
        if pkt_flags is None:
            pkt_flags = WRITER.packet_flags
        packet = self.build_packet(payload, trans_id, self.tx_write, pkt_flags)
        total = len(packet)
        if total >= self.tx.data_size:
            raise Violation(f"{self.name}: packet of {total} bytes cannot fit a {self.tx.data_size}-byte ring")
        stalls = 0
        while self._tx_free() <= total:  # never fill the ring completely
            self.stats["pending_send_waits"] += 1
            self.tx.set(PENDING_SEND_SZ, total)
            if mask_rx_while_waiting:
                # Only the guest's pending_send_sz signal may wake us now.
                self.rx.set(INTERRUPT_MASK, 1)
            full_barrier()
            if self._tx_free() > total:  # space appeared before the guest could see pending_send_sz
                break
            woke = self.wait_signal(wait_timeout)
            self.rx.set(INTERRUPT_MASK, 0)
            full_barrier()
            if not woke:
                free = self._tx_free()
                if free > total:
                    self.violations.append(
                        f"{self.name}: guest freed host-to-guest space to {free} bytes, crossing "
                        f"pending_send_sz={total}, but did not signal within {wait_timeout}s"
                    )
                    break
                stalls += 1
                if stalls >= 3:
                    raise Violation(f"{self.name}: host-to-guest ring stayed full for {3 * wait_timeout}s")
            # The guest may itself be waiting for room for its replies; keep its ring moving.
            self.backlog.extend(self.poll_received())
        self.tx.set(PENDING_SEND_SZ, 0)
        old_write = self.tx_write
        self.tx.write_data(old_write, packet)
        if old_write + total > self.tx.data_size:
            self.stats["sent_across_ring_end"] += 1
        new_write = (old_write + total) % self.tx.data_size
        if new_write < old_write:
            self.stats["tx_wraps"] += 1
        self.tx_write = new_write
        self.stats["packets_sent"] += 1
        if publish:
            self.publish()
        return trans_id

    def publish(self) -> None:
        """Makes every packet written so far visible with one write_index store, then signals."""
        old_write = self.tx_published
        if old_write == self.tx_write:
            return
        self.tx.set(WRITE_INDEX, self.tx_write)  # only after the bytes are in place
        self.tx_published = self.tx_write
        full_barrier()
        if self.tx.get(INTERRUPT_MASK) == 0 and self._guest_read_index() == old_write:
            self.signal()

    def tx_fits(self, total: int) -> bool:
        return self._tx_free() > total

    # ---- guest-to-host reader ----

    def _guest_write_index(self) -> int:
        w = self.rx.get(WRITE_INDEX)
        size = self.rx.data_size
        if w % 8 or w >= size:
            raise Violation(
                f"{self.name}: guest-to-host write_index {w:#x} (file offset {WRITE_INDEX}) "
                f"is not an 8-aligned offset below {size}"
            )
        # Published bytes cannot be withdrawn: the unread span may only grow.
        if (w - self.rx_read) % size < (self.rx_write_seen - self.rx_read) % size:
            raise Violation(
                f"{self.name}: guest-to-host write_index went back from {self.rx_write_seen:#x} "
                f"to {w:#x} (our read_index {self.rx_read:#x})"
            )
        self.rx_write_seen = w
        return w

    def try_read_packet(self):
        """Returns (type, flags, trans_id, payload) for one published packet, or None."""
        size = self.rx.data_size
        w = self._guest_write_index()
        avail = (w - self.rx_read) % size
        if avail == 0:
            return None
        pos = self.rx_read
        if avail < DESCRIPTOR.size + TRAILER.size:
            raise Violation(f"{self.name}: guest published {avail} bytes at {pos:#x}, less than a packet")
        ptype, off8, len8, pflags, tid = DESCRIPTOR.unpack(self.rx.read_data(pos, DESCRIPTOR.size))
        pkt_len = len8 * 8
        where = f"{self.name}: guest packet at data offset {pos:#x} (file offset {CONTROL_PAGE + pos:#x})"
        if off8 * 8 < DESCRIPTOR.size or off8 > len8:
            raise Violation(f"{where}: offset8={off8} len8={len8}: payload offset outside the packet")
        if pkt_len + TRAILER.size > avail:
            raise Violation(f"{where}: len8={len8} ({pkt_len}+8 bytes) but only {avail} bytes published")
        payload = self.rx.read_data((pos + off8 * 8) % size, pkt_len - off8 * 8)
        (trailer,) = TRAILER.unpack(self.rx.read_data((pos + pkt_len) % size, TRAILER.size))
        if trailer != pos << 32:
            self.oddities["bad_trailer"] += 1
            if self.first_bad_trailer is None:
                self.first_bad_trailer = f"{where}: trailer {trailer:#018x}, expected {pos << 32:#018x}"
        if pos + pkt_len + TRAILER.size > size:
            self.stats["received_across_ring_end"] += 1
        new_read = (pos + pkt_len + TRAILER.size) % size
        if new_read < pos:
            self.stats["rx_wraps"] += 1
        self.rx_read = new_read
        self.rx.set(READ_INDEX, new_read)  # publish only after we copied the bytes out
        self.stats["packets_received"] += 1
        self.last_rx_total = pkt_len + TRAILER.size
        full_barrier()
        pending = self.rx.get(PENDING_SEND_SZ)
        if pending:
            # Both sides of the crossing come from a write_index read after read_index was
            # published: with the one read before the packet, a write landing meanwhile would
            # hide the crossing and the guest would wait for a signal that never comes.
            free_after = size - (self._guest_write_index() - new_read) % size
            free_before = free_after - (pkt_len + TRAILER.size)
            if free_before <= pending < free_after:
                self.signal()
        self._check_padding(where, payload)
        return ptype, pflags, tid, payload

    def _check_padding(self, where: str, payload: bytes) -> None:
        if len(payload) < PIPE_HDR.size:
            return
        _, msgsize = PIPE_HDR.unpack_from(payload)
        end = PIPE_HDR.size + msgsize
        if end > len(payload):
            self.oddities["pipe_msgsize_exceeds_packet"] += 1
            return
        # Only the bytes that round the packet up to 8 are padding; anything longer is the
        # guest's choice of packet length (Linux echoes the host's whole buffer).
        pad = payload[end:][: (-end) % 8]
        if any(pad):
            self.oddities["nonzero_padding"] += 1
            if self.first_nonzero_padding is None:
                self.first_nonzero_padding = f"{where}: padding bytes {pad.hex()}"

    def check_owed_signals(self, since: tuple[int, int], settle: float = 1.0) -> None:
        """Checks the guest rang once per reply while replies always landed in an empty ring.

        In a lock-step exchange the host has read everything before it sends the next request,
        so each reply is written into an empty ring with interrupt_mask 0 and must be signalled.
        Extra signals are allowed (spurious interrupts are harmless); missing ones are not.
        """
        packets0, signals0 = since
        owed = self.stats["packets_received"] - packets0
        deadline = time.monotonic() + settle
        while True:
            self._drain_doorbell(block_first=False)
            got = self.stats["signals_received"] - signals0
            if got >= owed or time.monotonic() >= deadline:
                break
            select.select([self.conn], [], [], deadline - time.monotonic())
        if got < owed:
            self.violations.append(
                f"{self.name}: guest rang the doorbell {got} times for {owed} replies, each written "
                f"into an empty guest-to-host ring with interrupt_mask 0"
            )
        self.stats["lockstep_replies"] = self.stats.get("lockstep_replies", 0) + owed
        self.stats["lockstep_signals"] = self.stats.get("lockstep_signals", 0) + got

    def signal_mark(self) -> tuple[int, int]:
        self._drain_doorbell(block_first=False)
        return self.stats["packets_received"], self.stats["signals_received"]

    def poll_received(self) -> list:
        out = []
        while (pkt := self.try_read_packet()) is not None:
            out.append(pkt)
        return out

    def recv_packet(self, timeout: float):
        if self.backlog:
            return self.backlog.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            pkt = self.try_read_packet()
            if pkt is not None:
                return pkt
            left = deadline - time.monotonic()
            if left <= 0:
                raise Violation(f"{self.name}: no reply from the guest within {timeout}s")
            # The ring was empty with interrupt_mask 0, so the guest's next write must signal.
            # Waking up now and then tells a missing signal apart from a silent guest.
            if not self.wait_signal(min(left, MISSED_SIGNAL_SLICE)) and self._rx_has_data():
                self.violations.append(
                    f"{self.name}: guest published a packet into the empty guest-to-host ring "
                    f"(interrupt_mask 0) without ringing the doorbell"
                )

    def _rx_has_data(self) -> bool:
        return (self._guest_write_index() - self.rx_read) % self.rx.data_size != 0

    # ---- integration-component messages ----

    def ic_message(self, msgtype: int, fw, msgver, body: bytes, flags=IC_REQUEST_FLAGS) -> bytes:
        hdr = ICMSG_HDR.pack(fw[0], fw[1], msgtype, msgver[0], msgver[1], len(body), 0, 0, flags, b"\0\0")
        ic = hdr + body
        return PIPE_HDR.pack(PIPE_PACKET_TYPE_DATA, len(ic)) + ic

    def parse_reply(self, pkt, trans_id: int, msgtype: int, what: str):
        ptype, _pflags, tid, payload = pkt
        if ptype != VM_PKT_DATA_INBAND:
            raise Violation(f"{self.name}: {what} reply has packet type {ptype}, expected 6 (VM_PKT_DATA_INBAND)")
        if tid != trans_id:
            raise Violation(f"{self.name}: {what} reply carries transaction id {tid:#x}, expected {trans_id:#x}")
        if len(payload) < PIPE_HDR.size + ICMSG_HDR.size:
            raise Violation(f"{self.name}: {what} reply payload is {len(payload)} bytes, shorter than the IC headers")
        if len(payload) > MAX_IC_MESSAGE:
            raise Violation(f"{self.name}: {what} reply payload is {len(payload)} bytes, over {MAX_IC_MESSAGE}")
        _, _, mtype, _, _, icmsgsize, status, ic_tid, icflags, _ = ICMSG_HDR.unpack_from(payload, PIPE_HDR.size)
        if mtype != msgtype:
            raise Violation(f"{self.name}: {what} reply has icmsgtype {mtype}, expected {msgtype}")
        if icflags != IC_RESPONSE_FLAGS:
            raise Violation(f"{self.name}: {what} reply has icflags {icflags:#x}, expected 0x5 (TRANSACTION|RESPONSE)")
        if ic_tid != 0:
            raise Violation(f"{self.name}: {what} reply has ictransaction_id {ic_tid}, we sent 0")
        body = payload[PIPE_HDR.size + ICMSG_HDR.size :]
        if icmsgsize > len(body):
            raise Violation(f"{self.name}: {what} reply says icmsgsize={icmsgsize} but carries {len(body)} bytes")
        return status, body

    def negotiate(self, timeout: float) -> None:
        versions = FRAMEWORK_VERSIONS + self.msg_versions
        body = NEGOTIATE.pack(len(FRAMEWORK_VERSIONS), len(self.msg_versions), 0) + b"".join(
            VERSION.pack(*v) for v in versions
        )
        # Hyper-V leaves the header versions zero on the negotiate request (OpenVMM does the same).
        tid = self.send_packet(self.ic_message(ICMSGTYPE_NEGOTIATE, (0, 0), (0, 0), body))
        status, reply = self.parse_reply(self.recv_packet(timeout), tid, ICMSGTYPE_NEGOTIATE, "negotiate")
        if len(reply) < NEGOTIATE.size:
            raise Violation(f"{self.name}: negotiate reply body is {len(reply)} bytes, shorter than icmsg_negotiate")
        fw_cnt, msg_cnt, _ = NEGOTIATE.unpack_from(reply)
        self.result["negotiate_status"] = status
        if fw_cnt == 0 and msg_cnt == 0:
            self.result["negotiated"] = None
            self.result["negotiation"] = "no common version"
            return
        if fw_cnt != 1 or msg_cnt != 1:
            raise Violation(f"{self.name}: negotiate reply has icframe_vercnt={fw_cnt} icmsg_vercnt={msg_cnt}, expected 1/1 or 0/0")
        if len(reply) < NEGOTIATE.size + 2 * VERSION.size:
            raise Violation(f"{self.name}: negotiate reply announces 1+1 versions but carries {len(reply)} bytes")
        fw = VERSION.unpack_from(reply, NEGOTIATE.size)
        mv = VERSION.unpack_from(reply, NEGOTIATE.size + VERSION.size)
        if fw not in FRAMEWORK_VERSIONS:
            raise Violation(f"{self.name}: guest chose framework {fmt_version(fw)}, which we did not offer")
        if mv not in self.msg_versions:
            raise Violation(f"{self.name}: guest chose message version {fmt_version(mv)}, which we did not offer")
        if status != 0:
            raise Violation(f"{self.name}: negotiate reply chose versions but has status {status:#x}")
        self.fw, self.mv = fw, mv
        self.result["negotiated"] = {"framework": fmt_version(fw), "message": fmt_version(mv)}
        self.result["negotiation"] = "ok"

    def send_heartbeat(self, seq: int, **kw) -> int:
        body = HEARTBEAT_DATA.pack(seq % (1 << 64), bytes(32))[: WRITER.heartbeat_size]
        return self.send_packet(self.ic_message(ICMSGTYPE_HEARTBEAT, self.fw, self.mv, body), **kw)

    def check_heartbeat_reply(self, pkt, tid: int, seq: int) -> str | None:
        try:
            status, body = self.parse_reply(pkt, tid, ICMSGTYPE_HEARTBEAT, f"heartbeat seq {seq}")
        except Violation as e:
            return str(e)
        if status != 0:
            return f"heartbeat seq {seq}: status {status:#x}"
        if len(body) < 8:
            return f"heartbeat seq {seq}: reply body is {len(body)} bytes, no seq_num"
        (got,) = struct.unpack_from("<Q", body)
        if got != (seq + 1) % (1 << 64):
            return f"heartbeat seq {seq % (1 << 64)}: guest answered seq_num {got}, expected {(seq + 1) % (1 << 64)}"
        return None

    def heartbeats(self, count: int, first_seq: int, timeout: float, key: str) -> None:
        ok, failures = 0, []
        for i in range(count):
            seq = first_seq + i
            tid = self.send_heartbeat(seq)
            err = self.check_heartbeat_reply(self.recv_packet(timeout), tid, seq)
            if err is None:
                ok += 1
            elif len(failures) < 10:
                failures.append(err)
        self.result[key] = {"sent": count, "ok": ok, "failures": failures}

    def heartbeat_burst(self, count: int, first_seq: int, timeout: float) -> None:
        """Pipelines heartbeats so the host-to-guest ring fills and pending_send_sz is exercised."""
        self.backlog = []
        outstanding: dict[int, int] = {}  # trans_id -> seq, in send order
        ok, failures, sent = 0, [], 0

        def settle(pkt):
            nonlocal ok
            tid = pkt[2]
            seq = outstanding.pop(tid, None)
            if seq is None:
                failures.append(f"burst: reply with unknown transaction id {tid:#x}")
                return
            err = self.check_heartbeat_reply(pkt, tid, seq)
            if err is None:
                ok += 1
            elif len(failures) < 10:
                failures.append(err)

        waits_before = self.stats["pending_send_waits"]
        per_packet = len(self.heartbeat_packet_probe())
        full_batches = 0
        while sent < count:
            # Fill the ring up to the never-full limit and publish it with one write_index store,
            # so the guest faces a full ring no matter how fast it reads.
            while sent < count and self.tx_fits(per_packet):
                outstanding[self.send_heartbeat(first_seq + sent, publish=False)] = first_seq + sent
                sent += 1
            full_batches += 1
            self.publish()
            if sent < count:
                # Usually the guest has not caught up yet: this waits on pending_send_sz.
                tid = self.send_heartbeat(first_seq + sent, mask_rx_while_waiting=True, wait_timeout=timeout / 3)
                outstanding[tid] = first_seq + sent
                sent += 1
            while self.backlog:
                settle(self.backlog.pop(0))
            for pkt in self.poll_received():
                settle(pkt)
        while outstanding:
            settle(self.recv_packet(timeout))
        self.result["burst"] = {
            "sent": count,
            "ok": ok,
            "failures": failures,
            "ring_filled_to_the_limit": full_batches,
            "host_waited_for_space": self.stats["pending_send_waits"] - waits_before,
        }

    def guest_ring_full(self, timeout: float) -> None:
        """Stops reading until the guest's replies fill the guest-to-host ring, then drains it.

        The guest must stop short of a completely full ring, wait (announcing pending_send_sz),
        and carry on once the host frees space and rings it per the crossing rule.
        """
        per_packet = len(self.heartbeat_packet_probe())
        reply = self.last_rx_total  # the guest's heartbeat replies so far have all been this long
        if reply < DESCRIPTOR.size + TRAILER.size:
            raise Violation(f"{self.name}: no heartbeat reply seen yet to size the guest's packets")
        # One more request than the guest-to-host ring can hold replies for.
        want = self.rx.data_size // reply + 1
        outstanding: dict[int, int] = {}
        seq = 5_000_000
        deadline = time.monotonic() + timeout
        stalled_at = None
        pending_seen = 0
        while True:
            while len(outstanding) < want and self.tx_fits(per_packet):
                outstanding[self.send_heartbeat(seq, publish=False)] = seq
                seq += 1
            self.publish()
            w = self._guest_write_index()
            rx_free = self.rx.data_size - (w - self.rx_read) % self.rx.data_size
            pending_seen = self.rx.get(PENDING_SEND_SZ)
            if len(outstanding) == want and rx_free <= reply:
                if stalled_at is None:
                    stalled_at = time.monotonic()
                # Give the guest time to announce what it waits for before we free space.
                if pending_seen or time.monotonic() - stalled_at > 1.0:
                    break
            if time.monotonic() > deadline:
                raise Violation(
                    f"{self.name}: guest-to-host ring never filled: {rx_free} bytes free, "
                    f"{len(outstanding)} requests outstanding"
                )
            time.sleep(0.01)
        result = {
            "requests": want,
            "reply_bytes": reply,
            "ring_free_when_stalled": rx_free,
            "guest_pending_send_sz": pending_seen,
        }
        if pending_seen == 0:
            self.violations.append(
                f"{self.name}: guest-to-host ring stalled with {rx_free} bytes free but the guest left "
                f"pending_send_sz 0 (file offset {PENDING_SEND_SZ}), so no reader knows to wake it"
            )
        ok, failures = 0, []
        while outstanding:
            pkt = self.recv_packet(timeout)
            req = outstanding.pop(pkt[2], None)
            err = (f"reply with unknown transaction id {pkt[2]:#x}" if req is None
                   else self.check_heartbeat_reply(pkt, pkt[2], req))
            if err is None:
                ok += 1
            elif len(failures) < 10:
                failures.append(err)
        result.update(sent=want, ok=ok, failures=failures)
        self.result["guest_ring_full"] = result

    def heartbeat_packet_probe(self) -> bytes:
        """A heartbeat packet as the host would write it, for sizing."""
        body = HEARTBEAT_DATA.pack(0, bytes(32))[: WRITER.heartbeat_size]
        return self.build_packet(self.ic_message(ICMSGTYPE_HEARTBEAT, self.fw, self.mv, body), 0, 0, 0)

    def summary(self) -> dict:
        self.result["stats"] = self.stats
        self.result["oddities"] = self.oddities
        if self.first_bad_trailer:
            self.result["first_bad_trailer"] = self.first_bad_trailer
        if self.first_nonzero_padding:
            self.result["first_nonzero_padding"] = self.first_nonzero_padding
        self.result["violations"] = self.violations
        return self.result


def accept_all(channels: list[Channel], timeout: float) -> list[str]:
    waiting = {ch.listener: ch for ch in channels}
    deadline = time.monotonic() + timeout
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select(list(waiting), [], [], left)
        for lst in ready:
            conn, _ = lst.accept()
            waiting.pop(lst).accepted(conn)
    return [f"{ch.name}: guest did not connect to {ch.dir}/doorbell within {timeout}s" for ch in waiting.values()]


def die_mid_packet(ch: Channel) -> None:
    """Writes the first half of a heartbeat into the ring, never publishes it, and dies."""
    body = HEARTBEAT_DATA.pack(0xDEAD, bytes(32))
    payload = ch.ic_message(ICMSGTYPE_HEARTBEAT, ch.fw, ch.mv, body)
    packet = ch.build_packet(payload, ch.next_trans_id, ch.tx_write, 0)
    ch.tx.write_data(ch.tx_write, packet[: len(packet) // 2])
    sys.stdout.flush()
    os._exit(3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="shm transport root directory (must exist)")
    ap.add_argument("--ring-size", type=int, default=None,
                    help="bytes per direction including the control page (default 16384, 8192 with --wrap)")
    ap.add_argument("--heartbeats", type=int, default=5, help="heartbeats to exchange (default 5)")
    ap.add_argument("--wrap", action="store_true",
                    help="send enough heartbeats to wrap both rings several times, then a pipelined burst")
    ap.add_argument("--die-mid-packet", action="store_true",
                    help="after negotiation, write half a packet without publishing it and exit(3)")
    ap.add_argument("--desc-offset8", type=int, default=2,
                    help="offset8 of the packets the host writes (default 2: payload right after the descriptor)")
    ap.add_argument("--sloppy-writer", action="store_true",
                    help="write non-zero padding and wrong trailers, which the spec says readers must accept")
    ap.add_argument("--packet-flags", type=int, default=0, help="VMBus descriptor flags on host packets")
    ap.add_argument("--heartbeat-size", type=int, default=HEARTBEAT_DATA.size,
                    help="heartbeat body bytes, 8..40 (default 40 = Linux heartbeat_msg_data; OpenVMM sends 16)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the guest (default 30)")
    args = ap.parse_args()

    ring_size = args.ring_size or (8192 if args.wrap else 16384)
    if ring_size % 4096 or ring_size < 8192:
        print(f"--ring-size {ring_size}: must be a multiple of 4096 and at least 8192", file=sys.stderr)
        return 2
    if not 2 <= args.desc_offset8 <= 64 or not 8 <= args.heartbeat_size <= HEARTBEAT_DATA.size:
        print("--desc-offset8 must be 2..64 and --heartbeat-size 8..40", file=sys.stderr)
        return 2
    WRITER.offset8, WRITER.sloppy = args.desc_offset8, args.sloppy_writer
    WRITER.packet_flags, WRITER.heartbeat_size = args.packet_flags & 0xFFFF, args.heartbeat_size
    if not os.path.isdir(args.root):
        print(f"--root {args.root}: not a directory", file=sys.stderr)
        return 2

    channels = [Channel(args.root, i, n, c, v, ring_size) for i, (n, c, v) in enumerate(IC_SERVICES)]
    for ch in channels:
        ch.offer()

    summary = {
        "root": args.root,
        "writer": {
            "offset8": WRITER.offset8,
            "sloppy": WRITER.sloppy,
            "packet_flags": WRITER.packet_flags,
            "heartbeat_size": WRITER.heartbeat_size,
        },
        "ring_size": ring_size,
        "mode": "die-mid-packet" if args.die_mid_packet else "wrap" if args.wrap else "basic",
        "errors": accept_all(channels, args.timeout),
    }
    errors = summary["errors"]
    connected = [ch for ch in channels if ch.conn is not None]

    for ch in connected:
        try:
            mark = ch.signal_mark()
            ch.negotiate(args.timeout)
            ch.check_owed_signals(mark)
        except (Violation, ChannelClosed) as e:
            errors.append(str(e))
            ch.conn.close()
            ch.conn = None

    hb = next((ch for ch in channels if ch.name == "heartbeat" and ch.conn is not None), None)
    if hb is not None and hb.fw is not None:
        try:
            mark = hb.signal_mark()
            hb.heartbeats(args.heartbeats, 1000, args.timeout, "heartbeats")
            hb.check_owed_signals(mark)
            if args.die_mid_packet:
                summary["channels"] = {ch.name: ch.summary() for ch in channels}
                summary["ok"] = False
                summary["note"] = "exiting abruptly with half a packet unpublished in the heartbeat ring"
                print(json.dumps(summary, indent=2))
                die_mid_packet(hb)
            if args.wrap:
                per_packet = len(hb.heartbeat_packet_probe())
                n = (5 * hb.tx.data_size) // per_packet + 1
                mark = hb.signal_mark()
                hb.heartbeats(n, 1_000_000, args.timeout, "wrap_heartbeats")
                hb.check_owed_signals(mark)
                for direction in ("sent_across_ring_end", "received_across_ring_end"):
                    if hb.stats[direction] < 3:
                        errors.append(f"heartbeat: --wrap produced only {hb.stats[direction]} packets {direction}, wanted >= 3")
                hb.heartbeat_burst(4 * (hb.tx.data_size // per_packet), (1 << 64) - 40, args.timeout)
                if hb.result["burst"]["ring_filled_to_the_limit"] == 0:
                    errors.append("heartbeat: the burst never filled the host-to-guest ring")
                hb.guest_ring_full(args.timeout)
        except (Violation, ChannelClosed) as e:
            errors.append(str(e))
    elif hb is not None:
        errors.append("heartbeat: no versions negotiated, no heartbeats sent")

    summary["channels"] = {ch.name: ch.summary() for ch in channels}
    for ch in channels:
        r = ch.result
        if r.get("negotiation") != "ok" and ch.conn is not None:
            errors.append(f"{ch.name}: negotiation result {r.get('negotiation')!r}")
        errors.extend(ch.violations)
        for key in ("heartbeats", "wrap_heartbeats", "burst", "guest_ring_full"):
            part = r.get(key)
            if part and part["ok"] != part["sent"]:
                first = f"; first failure: {part['failures'][0]}" if part["failures"] else ""
                errors.append(f"{ch.name}: {key}: {part['ok']} of {part['sent']} answered correctly{first}")
    summary["ok"] = not errors
    for ch in channels:
        ch.rescind()
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
