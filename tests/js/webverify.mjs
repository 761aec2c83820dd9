// The page's own verifier (gracectl/webui/verify.js, the code the browser's Worker runs)
// on a saved stream, in Node, so every kind of tampering can be tried on it cheaply.
//
//   node tests/js/webverify.mjs KEY.PUB STREAM.jsonl [FRAMES_PER_MESSAGE]
//
// Feeds the lines as WebSocket messages of FRAMES_PER_MESSAGE frames (default 7), the
// first expected to be seq 1. Prints one JSON line: {"ok":true,"verified":N,"last":SEQ}
// or {"ok":false,"seq":SEQ,"reason":"..."}.
import { readFileSync } from "node:fs";
import { Failure, StreamVerifier, fromBase64, importKey, keyId } from "../../gracectl/webui/verify.js";

const [keyFile, streamFile, per = "7"] = process.argv.slice(2);
const words = readFileSync(keyFile, "utf8").trim().split(/\s+/);
const raw = fromBase64(words.length > 1 ? words[1] : words[0]);
const verifier = new StreamVerifier(await importKey(raw), await keyId(raw));
verifier.expect = 1;
const lines = readFileSync(streamFile, "utf8").split("\n").filter((l) => l !== "");
try {
  for (let i = 0; i < lines.length; i += Number(per)) {
    await verifier.check(lines.slice(i, i + Number(per)));
  }
  console.log(JSON.stringify({ ok: true, verified: verifier.verified, last: verifier.lastSeq }));
} catch (e) {
  if (!(e instanceof Failure)) throw e;
  console.log(JSON.stringify({ ok: false, seq: e.seq, reason: e.reason }));
}
