"""Raft scenarios as readable transcripts (tests/raft/testdata/*.txt).

Each file is a sequence of commands, each followed by ``----`` and the output it
must produce, ended by a blank line:

    add-nodes 3 seed=1      # nodes 1..3 (options: seed=, pre_vote=, check_quorum=)
    campaign 1              # node 1 starts an election now
    stabilize               # deliver messages until the network is quiet; prints them
    tick 1 [n]              # n ticks on node 1 (all nodes: tick all [n])
    propose 1 data          # node 1 proposes "data"
    partition 1 | 2 3       # cut the network between the groups; heal joins it again
    run n                   # n rounds of: every node ticks, then the network settles (quiet)
    status                  # role, term, leader, commit and last index of every node
    log 1                   # node 1's log as term/index:data

Set ``RAFT_REWRITE=1`` to write the current outputs back into the files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pserver.raft import MsgType, Role
from pserver.raft.core import ProposalDropped

from .harness import Cluster

DATA = Path(__file__).parent / "testdata"


def _describe(m: object) -> str:
    from pserver.raft import Message

    assert isinstance(m, Message)
    parts = [f"{m.frm}->{m.to} {MsgType(m.type).name} term={m.term}"]
    if m.type in (MsgType.APP, MsgType.VOTE, MsgType.PRE_VOTE):
        parts.append(f"index={m.index} log_term={m.log_term}")
    if m.entries:
        parts.append("entries=[" + " ".join(f"{e.term}/{e.index}:{e.data.decode() or '-'}"
                                             for e in m.entries) + "]")
    if m.type in (MsgType.APP, MsgType.HEARTBEAT) and m.commit:
        parts.append(f"commit={m.commit}")
    if m.type == MsgType.APP_RESP:
        parts.append(f"index={m.index}")
    if m.reject:
        parts.append("reject" + (f" hint={m.reject_hint}" if m.reject_hint else ""))
    return " ".join(parts)


class Runner:
    def __init__(self) -> None:
        self.c: Cluster | None = None

    @property
    def cluster(self) -> Cluster:
        assert self.c is not None, "add-nodes first"
        return self.c

    def run(self, line: str) -> str:
        cmd, *args = line.split()
        return getattr(self, "cmd_" + cmd.replace("-", "_"))(args)

    def cmd_add_nodes(self, args: list[str]) -> str:
        opts = dict(a.split("=") for a in args[1:])
        seed = int(opts.pop("seed", "0"))
        cfg = {k: v == "true" for k, v in opts.items()}
        self.c = Cluster(int(args[0]), seed=seed, **cfg)  # type: ignore[arg-type]
        return ""

    def cmd_campaign(self, args: list[str]) -> str:
        i = int(args[0])
        self.cluster.nodes[i].core.campaign()
        self.cluster.process(i)
        return ""

    def cmd_tick(self, args: list[str]) -> str:
        n = int(args[1]) if len(args) > 1 else 1
        for _ in range(n):
            self.cluster.tick(None if args[0] == "all" else int(args[0]))
        return ""

    def cmd_propose(self, args: list[str]) -> str:
        i = int(args[0])
        try:
            index = self.cluster.nodes[i].core.propose(args[1].encode())
        except ProposalDropped as exc:
            return f"dropped: leader hint {exc.leader_hint}"
        self.cluster.process(i)
        return f"index {index}"

    def cmd_stabilize(self, args: list[str]) -> str:
        c, out = self.cluster, []
        while c.queue:
            batch, c.queue = c.queue, []
            for m in batch:
                if frozenset((m.frm, m.to)) in c.cut:
                    out.append(_describe(m) + "  (cut)")
                    continue
                out.append(_describe(m))
                c.nodes[m.to].core.step(m)
                c.process(m.to)
        c.check_invariants()
        return "\n".join(out)

    def cmd_run(self, args: list[str]) -> str:
        self.cluster.run(int(args[0]))
        self.cluster.check_invariants()
        return ""

    def cmd_log(self, args: list[str]) -> str:
        core = self.cluster.nodes[int(args[0])].core
        return " ".join(f"{e.term}/{e.index}:{e.data.decode() or '-'}" for e in core.log)

    def cmd_partition(self, args: list[str]) -> str:
        groups, cur = [], set()
        for a in args:
            if a == "|":
                groups.append(cur)
                cur = set()
            else:
                cur.add(int(a))
        groups.append(cur)
        self.cluster.partition(*groups)
        return ""

    def cmd_heal(self, args: list[str]) -> str:
        self.cluster.heal()
        return ""

    def cmd_status(self, args: list[str]) -> str:
        lines = []
        for i, nd in sorted(self.cluster.nodes.items()):
            r = nd.core
            lines.append(f"{i}: {Role(r.role).value} term={r.term} lead={r.lead} "
                         f"commit={r.commit} last={r.last_index} applied={len(nd.applied)}")
        return "\n".join(lines)


def _blocks(text: str) -> list[tuple[str, str]]:
    """(command, expected output) pairs; comments and blank lines between them skipped."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i].split("#")[0].strip()
        i += 1
        if not line:
            continue
        assert lines[i] == "----", f"line {i + 1}: expected ----"
        i += 1
        expected = []
        while i < len(lines) and lines[i] != "":
            expected.append(lines[i])
            i += 1
        out.append((line, "\n".join(expected)))
    return out


@pytest.mark.parametrize("path", sorted(DATA.glob("*.txt")), ids=lambda p: p.stem)
def test_transcript(path: Path) -> None:
    runner = Runner()
    blocks = _blocks(path.read_text())
    got = [(cmd, runner.run(cmd)) for cmd, _ in blocks]
    if os.environ.get("RAFT_REWRITE"):
        head = "".join(f"{ln}\n" for ln in path.read_text().splitlines()
                       if ln.startswith("#"))
        path.write_text(head + "".join(f"{cmd}\n----\n{out}\n" + ("\n" if out else "")
                                       for cmd, out in got))
        return
    for (cmd, want), (_, have) in zip(blocks, got, strict=True):
        assert have == want, f"{path.name}: {cmd!r}\n--- want\n{want}\n--- got\n{have}"
