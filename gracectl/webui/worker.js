// The Worker: holds the WebSocket to the relay, verifies every frame before the page
// sees it, and stops at the first one that fails. The page receives only verified data.
//
// page -> worker: {type: "start", url, token, session, pinned, given}  (keys: base64 or null)
//                 {type: "request", id, method, params}
// worker -> page: {type: "session", session}           the relay's secret for this page
//                 {type: "key", kid, publicKey, how}   how: pinned | given | first-use
//                 {type: "ready", hello, since, subscribed, anchor}
//                   subscribed: when the subscribe went out; anchor: {daemon, sent}: the
//                   hello reply's signed ts and when the hello went out (seconds)
//                 {type: "events", events, lastSeq, verified, at, interval}
//                 {type: "response", id, ok, result, error}
//                 {type: "notice", notice}
//                 {type: "fail", seq, reason}   (nothing follows)
//                 {type: "closed", reason, retry}   retry: seconds until the next
//                   attempt with this page's session (null: no retry, e.g. refused)
//
// After graced restarts (or the relay loses it), the worker reconnects with the same
// session and backs off; the resumed stream must continue the verified chain exactly
// (same key, seq lastSeq + 1 whose prev is the last verified hash), as strict as ever.
import { Failure, StreamVerifier, fromBase64, importKey, keyId, toBase64 } from "./verify.js";

const BACKLOG = 200; // events replayed before the head, for the feed
const FLUSH_MS = 50; // verified events are handed to the page at most this often

let ws = null;
let verifier = null;
let failed = false;
let queue = Promise.resolve();
let pending = new Map(); // request id -> {nonce, resolve}
let nextId = 1;
let outbox = [];
let flushTimer = null;
let interval = null;
let mySession = null; // the relay's secret for this page, once given
let delay = 0; // the reconnect backoff, seconds
const RETRY_MIN = 0.5;
const RETRY_MAX = 10;
// Closes after which a retry cannot help: a verification failure, a refused login or
// session, a refused request.
const FINAL = new Set([4000, 4001, 4003]);

function nonce() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

function fail(seq, reason) {
  if (failed) return;
  failed = true;
  flush();
  postMessage({ type: "fail", seq, reason });
  pending = new Map();
  try {
    ws.close(4000, "verification failed");
  } catch {
    // already closed
  }
}

function flush() {
  flushTimer = null;
  if (outbox.length === 0 || verifier === null) return;
  postMessage({
    type: "events", events: outbox, lastSeq: verifier.lastSeq, verified: verifier.verified,
    at: Date.now(), interval,
  });
  outbox = [];
}

function send(method, params) {
  const id = nextId++;
  const n = nonce();
  return new Promise((resolve) => {
    pending.set(id, { nonce: n, resolve });
    ws.send(JSON.stringify({ id, nonce: n, method, params }));
  });
}

function announced(ev) {
  const p = ev.payload;
  if (ev.topic === "daemon.heartbeat" && p && typeof p.interval === "number") return p.interval;
  if (ev.topic === "daemon.config_reloaded" && p && typeof p.heartbeat_interval === "number") {
    return p.heartbeat_interval;
  }
  return null;
}

// Before a key is trusted: the hello reply alone, read to learn which key it claims.
async function trustFromHello(text, pinned, given) {
  let frame;
  try {
    frame = JSON.parse(text);
  } catch {
    throw new Failure(null, "the hello reply is not JSON");
  }
  const claimed = frame && frame.result && frame.result.public_key;
  if (typeof claimed !== "string") throw new Failure(null, "a hello reply without a key");
  const raw = fromBase64(claimed);
  if (raw.length !== 32) throw new Failure(null, "a hello reply with a malformed key");
  const offered = await keyId(raw);
  let trusted = raw;
  let how = "first-use";
  if (pinned) {
    trusted = fromBase64(pinned);
    how = "pinned";
  } else if (given) {
    trusted = fromBase64(given);
    how = "given";
  }
  const kid = await keyId(trusted);
  if (kid !== offered) {
    throw new Failure(null, `KEY CHANGED: this page trusts key ${kid} (${how}), the daemon now `
      + `offers ${offered}. Refused: if the key was rotated on purpose, clear the pin (site `
      + "data) and reload");
  }
  verifier = new StreamVerifier(await importKey(trusted), kid);
  postMessage({ type: "key", kid, publicKey: toBase64(trusted), how });
}

async function onMessage(text) {
  if (failed) return;
  const lines = text.split("\n");
  let items;
  try {
    items = await verifier.check(lines);
  } catch (e) {
    if (e instanceof Failure) fail(e.seq, e.message);
    else fail(null, `cannot verify: ${e.message}`);
    return;
  }
  for (const { kind, frame } of items) {
    if (kind === "event") {
      const i = announced(frame);
      if (i !== null) interval = i;
      outbox.push(frame);
    } else if (kind === "response") {
      const waiting = pending.get(frame.id);
      if (!waiting || waiting.nonce !== frame.nonce) {
        fail(null, "a response that answers no request of ours (replayed?)");
        return;
      }
      pending.delete(frame.id);
      waiting.resolve(frame);
    } else {
      postMessage({ type: "notice", notice: frame });
    }
  }
  if (outbox.length && flushTimer === null) flushTimer = setTimeout(flush, FLUSH_MS);
}

// The relay's own first message: the page's session secret (the login token is spent).
function relayed(text) {
  let msg = null;
  try {
    msg = JSON.parse(text);
  } catch {
    // not the relay's message
  }
  if (!msg || msg.relay !== "session" || typeof msg.session !== "string") {
    throw new Failure(null, "the relay did not answer the login");
  }
  mySession = msg.session;
  postMessage({ type: "session", session: msg.session });
}

// A resumed connection's hello reply: the same key as before, and a head not behind
// what was verified already.
function resumedHello(h, frame) {
  if (!h || h.kid !== verifier.kid || frame.kid !== verifier.kid) {
    throw new Failure(null, `KEY CHANGED on reconnect: this page trusts key ${verifier.kid}, `
      + `the daemon now offers ${h && h.kid}. Refused`);
  }
  if (verifier.lastSeq !== null && h.head_seq < verifier.lastSeq) {
    throw new Failure(null, `on reconnect the daemon's head is seq ${h.head_seq}, behind the `
      + `seq ${verifier.lastSeq} already verified here (a replaced or rewound journal)`);
  }
}

function start({ url, token, session, pinned, given }) {
  ws = new WebSocket(url);
  const resuming = verifier !== null;
  let awaitingHello = true; // the first message after the relay's: the hello reply
  let hello = null;
  let helloSent = null;
  let signedIn = false;
  ws.onopen = () => {
    ws.send(JSON.stringify(session ? { session } : { token }));
    const n = nonce();
    hello = n;
    helloSent = Date.now() / 1000;
    ws.send(JSON.stringify({ id: 0, nonce: n, method: "hello", params: {} }));
  };
  ws.onclose = (e) => {
    if (failed) return;
    // Requests in flight get no answer from this connection.
    for (const [id, w] of pending) {
      if (id !== 0) w.resolve({ ok: false, error: { code: "unavailable", message: "disconnected" } });
    }
    pending = new Map();
    const retry = mySession !== null && verifier !== null && !FINAL.has(e.code);
    if (retry) {
      delay = delay ? Math.min(RETRY_MAX, delay * 2) : RETRY_MIN;
      setTimeout(() => {
        if (!failed) start({ url, token: "", session: mySession, pinned, given });
      }, delay * 1000);
    }
    postMessage({ type: "closed", reason: `${e.code} ${e.reason || ""}`.trim(),
      retry: retry ? delay : null });
  };
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") {
      fail(null, "a binary message");
      return;
    }
    queue = queue.then(async () => {
      if (failed) return;
      if (!signedIn) {
        try {
          relayed(e.data);
        } catch (err) {
          fail(null, err.message);
          return;
        }
        signedIn = true;
        return;
      }
      if (awaitingHello) {
        awaitingHello = false;
        if (!resuming) {
          try {
            await trustFromHello(e.data, pinned, given);
          } catch (err) {
            fail(null, err instanceof Failure ? err.message : String(err));
            return;
          }
        }
        // The same hello reply, now verified against the trusted key.
        pending.set(0, {
          nonce: hello,
          resolve: async (frame) => {
            if (!frame.ok) {
              fail(null, `hello refused: ${frame.error && frame.error.message}`);
              return;
            }
            const h = frame.result;
            if (resuming) {
              try {
                resumedHello(h, frame);
              } catch (err) {
                fail(null, err.message);
                return;
              }
            }
            interval = h.heartbeat_interval;
            // Resumed: from the event after the last one verified, whose prev must be
            // that event's hash (the verifier keeps both).
            const since = resuming && verifier.lastSeq !== null ? verifier.lastSeq + 1
              : Math.max(1, h.head_seq - BACKLOG + 1);
            if (!resuming || verifier.lastSeq === null) verifier.expect = since;
            delay = 0;
            const subscribed = Date.now() / 1000;
            const sub = await send("subscribe", { patterns: ["*"], since });
            if (!sub.ok) {
              fail(null, `subscribe refused: ${sub.error && sub.error.message}`);
              return;
            }
            // The clock anchor: the daemon signed the hello reply at frame.ts, after the
            // browser sent the hello. Taking the send time (not the arrival) makes a
            // heartbeat's lag never look smaller than it is, however long the reply was
            // held on its way.
            const daemon = Date.parse(frame.ts) / 1000;
            postMessage({ type: "ready", hello: h, since, subscribed, resumed: resuming,
              anchor: Number.isFinite(daemon) ? { daemon, sent: helloSent } : null });
          },
        });
      }
      await onMessage(e.data);
    });
  };
}

onmessage = async (e) => {
  const msg = e.data;
  if (msg.type === "start") {
    start(msg);
  } else if (msg.type === "request") {
    if (failed || ws === null || ws.readyState !== WebSocket.OPEN || verifier === null) {
      postMessage({ type: "response", id: msg.id, ok: false,
        error: { code: "unavailable", message: "not connected or verification failed" } });
      return;
    }
    const frame = await send(msg.method, msg.params);
    postMessage({ type: "response", id: msg.id, ok: frame.ok, result: frame.result,
      error: frame.error });
  }
};
