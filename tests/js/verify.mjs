// An independent verifier of a Grace event stream, written from docs/protocol.md alone.
//
//   node tests/js/verify.mjs KEY.PUB STREAM.jsonl [--partial]
//
// Node's built-in WebCrypto only (Ed25519, SHA-256); no package. Protocol version 2
// (RFC 8785 canonical JSON). Exit codes as gracectl's: 0 proved, 10 bad signature or
// unknown key, 11 chain broken (also: a line not in canonical form, a missing head, an
// empty stream), 12 replayed, 13 missing tail. Prints one line.
import { readFileSync } from "node:fs";

const subtle = globalThis.crypto.subtle;
const FIELDS = ["kid", "payload", "prev", "seq", "sig", "topic", "ts", "v"];
const GENESIS = "0".repeat(64);

class Fail extends Error {
  constructor(code, seq, reason) {
    super(`${seq === null ? "" : `seq ${seq}: `}${reason}`);
    this.code = code;
  }
}

// RFC 8785: keys sorted by UTF-16 code units (JavaScript's default string order),
// strings and numbers as JSON.stringify writes them; no lone surrogates, finite numbers.
function canonical(value, depth = 1) {
  if (depth > 64) throw new Error("nested deeper than 64");
  if (value === null || typeof value === "boolean") return JSON.stringify(value);
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new Error("not a finite number");
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

const hex = (buf) => Buffer.from(buf).toString("hex");

async function main() {
  const [keyFile, streamFile, ...flags] = process.argv.slice(2);
  const partial = flags.includes("--partial");
  const keyText = readFileSync(keyFile, "utf8").trim().split(/\s+/);
  const raw = Buffer.from(keyText.length > 1 ? keyText[1] : keyText[0], "base64");
  const kid = hex(await subtle.digest("SHA-256", raw)).slice(0, 16);
  const key = await subtle.importKey("raw", raw, { name: "Ed25519" }, false, ["verify"]);
  const data = readFileSync(streamFile);
  const decoder = new TextDecoder("utf-8", { fatal: true });
  const encoder = new TextEncoder();

  let lastSeq = null, lastHash = null, lastTopic = null, count = 0, suspect = null;
  const seen = new Map();
  let start = 0;
  while (start < data.length) {
    const end = data.indexOf(0x0a, start);
    if (end < 0) throw new Fail(11, null, "the last line has no newline (cut mid-line)");
    const bytes = data.subarray(start, end);
    start = end + 1;
    let text, ev;
    try {
      text = decoder.decode(bytes);
      ev = JSON.parse(text);
    } catch {
      throw new Fail(11, lastSeq === null ? null : lastSeq + 1, "not a UTF-8 JSON line");
    }
    const seqHint = ev && typeof ev.seq === "number" ? ev.seq : null;
    if (typeof ev !== "object" || ev === null || Array.isArray(ev)
        || Object.keys(ev).sort().join() !== FIELDS.join()) {
      throw new Fail(11, seqHint, "malformed event (fields)");
    }
    if (ev.v !== 2) throw new Fail(11, seqHint, `unsupported version ${ev.v}`);
    if (!Number.isSafeInteger(ev.seq) || ev.seq < 1) throw new Fail(11, null, "bad seq");
    let canon;
    try {
      canon = canonical(ev);
    } catch (e) {
      throw new Fail(11, ev.seq, `not canonical JSON: ${e.message}`);
    }
    if (canon !== text) throw new Fail(11, ev.seq, "not in canonical form");
    if (ev.kid !== kid) throw new Fail(10, ev.seq, `unknown key ${ev.kid}`);
    const { sig, ...unsigned } = ev;
    const signing = encoder.encode(canonical(unsigned));
    const hash = hex(await subtle.digest("SHA-256", signing));
    if (lastSeq === null) {
      if (ev.seq !== 1 || ev.prev !== GENESIS) throw new Fail(11, ev.seq, "missing head");
    } else if (ev.seq <= lastSeq) {
      if (seen.get(ev.seq) === hash) throw new Fail(12, ev.seq, "replayed event");
      throw new Fail(11, ev.seq, "out of order");
    } else if (ev.seq !== lastSeq + 1) {
      throw new Fail(11, ev.seq, "gap");
    }
    const sigBytes = Buffer.from(sig, "base64");
    const ok = sigBytes.length === 64 && sigBytes.toString("base64") === sig
      && await subtle.verify({ name: "Ed25519" }, key, sigBytes, signing);
    if (suspect !== null) {
      if (ok && ev.prev === suspect.hash) throw new Fail(10, suspect.seq, "bad signature (forged)");
      throw new Fail(11, suspect.seq, "altered event");
    }
    if (lastHash !== null && ev.prev !== lastHash) throw new Fail(11, ev.seq, "chain broken");
    lastSeq = ev.seq; lastHash = hash; lastTopic = ev.topic; count += 1;
    seen.set(ev.seq, hash);
    if (!ok) suspect = { seq: ev.seq, hash };
  }
  if (suspect !== null) throw new Fail(10, suspect.seq, "bad signature");
  if (count === 0) throw new Fail(11, null, "empty stream");
  if (!partial && lastTopic !== "daemon.stopping") throw new Fail(13, lastSeq, "missing tail");
  console.log(`verified ${count} events (seq 1..${lastSeq}), last hash ${lastHash}`);
}

main().catch((e) => {
  console.log(`verification failed: ${e.message}`);
  process.exit(e instanceof Fail ? e.code : 1);
});
