// Verification of graced's frames in the browser, from docs/protocol.md alone (the same
// checks as tests/js/verify.mjs, for a live stream): strict RFC 8785 canonical form,
// Ed25519 with WebCrypto against the pinned key, seq continuity and the hash chain.
// No DOM here: it runs in the Worker.

export const FIELDS = ["kid", "payload", "prev", "seq", "sig", "topic", "ts", "v"];

export class Failure extends Error {
  constructor(seq, reason) {
    super(reason);
    this.seq = seq;
    this.reason = reason;
  }
}

// RFC 8785: keys sorted by UTF-16 code units (JavaScript's default string order),
// strings and numbers as JSON.stringify writes them; no lone surrogates, finite numbers.
export function canonical(value, depth = 1) {
  if (depth > 64) throw new Error("nested deeper than 64");
  if (value === null || typeof value === "boolean") return JSON.stringify(value);
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new Error("not a finite number");
    if (Number.isInteger(value) && !Number.isSafeInteger(value)) {
      throw new Error("an integer beyond 2^53");
    }
    return JSON.stringify(value);
  }
  if (typeof value === "string") {
    if (!value.isWellFormed()) throw new Error("a lone surrogate");
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) return `[${value.map((v) => canonical(v, depth + 1)).join(",")}]`;
  const keys = Object.keys(value).sort();
  return `{${keys.map((k) => {
    if (!k.isWellFormed()) throw new Error("a lone surrogate");
    return `${JSON.stringify(k)}:${canonical(value[k], depth + 1)}`;
  }).join(",")}}`;
}

const encoder = new TextEncoder();

export function hex(buf) {
  return Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");
}

export function fromBase64(text) {
  const bin = atob(text);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

export function toBase64(bytes) {
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin);
}

export async function keyId(raw) {
  return hex(await crypto.subtle.digest("SHA-256", raw)).slice(0, 16);
}

export async function importKey(raw) {
  return crypto.subtle.importKey("raw", raw, { name: "Ed25519" }, false, ["verify"]);
}

// Parse one frame; it counts only if its text is exactly its canonical form.
export function parseStrict(text) {
  let obj;
  try {
    obj = JSON.parse(text);
  } catch {
    throw new Failure(null, "a frame that is not JSON");
  }
  if (typeof obj !== "object" || obj === null || Array.isArray(obj)) {
    throw new Failure(null, "a frame that is not a JSON object");
  }
  const seq = typeof obj.seq === "number" ? obj.seq : null;
  let canon;
  try {
    canon = canonical(obj);
  } catch (e) {
    throw new Failure(seq, `not canonical JSON: ${e.message}`);
  }
  if (canon !== text) throw new Failure(seq, "not in canonical form");
  return obj;
}

async function signatureOk(key, sig, signing) {
  let bytes;
  try {
    bytes = fromBase64(sig);
  } catch {
    return false;
  }
  if (bytes.length !== 64 || toBase64(bytes) !== sig) return false;
  return crypto.subtle.verify({ name: "Ed25519" }, key, bytes, signing);
}

// Checks frames in order. ``expect``: the seq the first event must have (null: any).
export class StreamVerifier {
  constructor(key, kid) {
    this.key = key;
    this.kid = kid;
    this.expect = null;
    this.lastSeq = null;
    this.lastHash = null;
    this.verified = 0;
  }

  // Every frame of one WebSocket message: [{kind: "event"|"response"|"notice", frame}].
  // Signatures and hashes are computed in parallel, then checked in order.
  async check(texts) {
    const frames = texts.map((t) => parseStrict(t));
    const work = frames.map(async (f) => {
      if (typeof f.sig !== "string" || typeof f.kid !== "string") {
        throw new Failure(typeof f.seq === "number" ? f.seq : null, "an unsigned frame");
      }
      const { sig, ...unsigned } = f;
      const signing = encoder.encode(canonical(unsigned));
      const [ok, digest] = await Promise.all([
        f.kid === this.kid ? signatureOk(this.key, sig, signing) : false,
        "type" in f ? null : crypto.subtle.digest("SHA-256", signing),
      ]);
      return { ok, hash: digest === null ? null : hex(digest) };
    });
    const results = await Promise.all(work);
    const out = [];
    frames.forEach((f, i) => {
      const { ok, hash } = results[i];
      if ("type" in f) {
        if (f.kid !== this.kid) throw new Failure(null, `a ${f.type} signed by unknown key ${f.kid}`);
        if (!ok) throw new Failure(null, `a ${f.type} whose signature does not verify`);
        if (f.type !== "response" && f.type !== "notice") {
          throw new Failure(null, `a frame of unknown type ${String(f.type).slice(0, 40)}`);
        }
        out.push({ kind: f.type, frame: f });
        return;
      }
      out.push({ kind: "event", frame: this.event(f, ok, hash) });
    });
    return out;
  }

  event(ev, ok, hash) {
    const seq = typeof ev.seq === "number" ? ev.seq : null;
    if (Object.keys(ev).sort().join() !== FIELDS.join()) {
      throw new Failure(seq, "malformed event (fields)");
    }
    if (ev.v !== 2) throw new Failure(seq, `protocol version ${ev.v} is not verified here`);
    if (!Number.isSafeInteger(ev.seq) || ev.seq < 1) throw new Failure(null, "bad seq");
    if (ev.kid !== this.kid) throw new Failure(ev.seq, `unknown key ${ev.kid}`);
    if (this.lastSeq === null) {
      if (this.expect !== null && ev.seq !== this.expect) {
        throw new Failure(ev.seq, `missing head: expected seq ${this.expect} first`);
      }
    } else if (ev.seq <= this.lastSeq) {
      throw new Failure(ev.seq, `replayed or reordered (after seq ${this.lastSeq})`);
    } else if (ev.seq !== this.lastSeq + 1) {
      throw new Failure(ev.seq, `gap: seq ${this.lastSeq + 1} is missing`);
    }
    if (!ok) throw new Failure(ev.seq, "bad signature (forged or altered)");
    if (this.lastHash !== null && ev.prev !== this.lastHash) {
      throw new Failure(ev.seq, "chain broken (prev is not the previous event's hash)");
    }
    this.lastSeq = ev.seq;
    this.lastHash = hash;
    this.verified += 1;
    return ev;
  }
}
