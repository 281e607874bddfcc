// The official JS client (@fal-ai/client, pinned in package.json) in proxy mode against a
// live kontext-server: every call goes to <server>/proxy with the fal URL in the header
// x-fal-target-url, with no URL rewriting on the client's side; uploads (fal.storage.upload
// and Blobs inside an input) are stored on the server and work as image_url.
//
// Run by tests/e2e/test_uploads_e2e.py, which sets:
//   KONTEXT_E2E_URL    http://127.0.0.1:PORT
//   KONTEXT_E2E_IMAGE  a small PNG as a data: URI
// By hand: KONTEXT_E2E_URL=... KONTEXT_E2E_IMAGE=... node --test uploads_proxy.test.mjs

import assert from "node:assert/strict";
import { test } from "node:test";

import { createFalClient } from "@fal-ai/client";

const BASE = process.env.KONTEXT_E2E_URL;
const IMAGE = process.env.KONTEXT_E2E_IMAGE;
assert.ok(BASE, "set KONTEXT_E2E_URL to the server's base URL");
assert.ok(IMAGE, "set KONTEXT_E2E_IMAGE to an image data: URI");

const ENDPOINT = "fal-ai/flux-pro/kontext/max";
const STATUSES = new Set(["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]);
const TIMEOUT_MS = 60_000;
const PNG_BYTES = Buffer.from(IMAGE.split(",")[1], "base64");

const seenTargets = [];
const fal = createFalClient({
  credentials: "e2e-any-key",
  proxyUrl: { url: `${BASE}/proxy`, when: "always" },
  // Only watches what the client sends; the URL and headers go out unchanged.
  fetch: async (url, init) => {
    const headers = new Headers(init?.headers);
    seenTargets.push({ url: String(url), target: headers.get("x-fal-target-url") });
    return fetch(url, init);
  },
});

function pngBlob() {
  return new Blob([PNG_BYTES], { type: "image/png" });
}

async function assertServedImage(url) {
  assert.ok(url.startsWith(`${BASE}/`), `${url} is not on ${BASE}`);
  const response = await fetch(url);
  assert.equal(response.status, 200);
  return new Uint8Array(await response.arrayBuffer());
}

test("fal.storage.upload stores a Blob on the server and answers its URL", { timeout: TIMEOUT_MS }, async () => {
  const url = await fal.storage.upload(pngBlob());

  const bytes = await assertServedImage(url);
  assert.deepEqual(Buffer.from(bytes), PNG_BYTES);
  const initiate = seenTargets.find((s) => (s.target ?? "").includes("/storage/upload/initiate"));
  assert.ok(initiate, "the initiate call did not go through the proxy");
  assert.equal(initiate.url, `${BASE}/proxy`);
});

test("a Blob inside the input is uploaded and the edit completes through the proxy", { timeout: TIMEOUT_MS }, async () => {
  const updates = [];
  const result = await fal.subscribe(ENDPOINT, {
    input: { prompt: "Put a donut next to the flour.", image_url: pngBlob(), seed: 51 },
    logs: true,
    pollInterval: 50,
    onQueueUpdate: (update) => updates.push(update),
  });

  assert.ok(updates.every((u) => STATUSES.has(u.status)));
  assert.equal(updates.at(-1).status, "COMPLETED");
  assert.equal(result.data.seed, 51);
  assert.equal(result.data.images.length, 1);
  await assertServedImage(result.data.images[0].url);
  const submitted = seenTargets.find((s) => s.target === `https://queue.fal.run/${ENDPOINT}`);
  assert.ok(submitted, "submit did not go through the proxy");
});

test("subscribe in streaming mode works through the proxy", { timeout: TIMEOUT_MS }, async () => {
  const updates = [];
  const result = await fal.subscribe(ENDPOINT, {
    input: { prompt: "Make it night.", image_url: IMAGE, seed: 52 },
    mode: "streaming",
    onQueueUpdate: (update) => updates.push(update),
  });

  assert.ok(updates.length > 0, "no status events on the stream");
  assert.equal(updates.at(-1).status, "COMPLETED");
  assert.equal(result.data.seed, 52);
});

test("submit, status and result by request id through the proxy", { timeout: TIMEOUT_MS }, async () => {
  const { request_id: requestId } = await fal.queue.submit(ENDPOINT, {
    input: { prompt: "Add a hat.", image_url: IMAGE, seed: 53 },
  });
  const deadline = Date.now() + TIMEOUT_MS;
  let status;
  do {
    assert.ok(Date.now() < deadline, `request ${requestId} did not complete`);
    await new Promise((resolve) => setTimeout(resolve, 50));
    status = await fal.queue.status(ENDPOINT, { requestId, logs: true });
    assert.ok(STATUSES.has(status.status), `unexpected status ${status.status}`);
  } while (status.status !== "COMPLETED");

  const result = await fal.queue.result(ENDPOINT, { requestId });
  assert.equal(result.requestId, requestId);
  assert.equal(result.data.seed, 53);
});

test("the proxy refuses a target that is not a fal host", { timeout: TIMEOUT_MS }, async () => {
  const response = await fetch(`${BASE}/proxy`, {
    method: "POST",
    headers: { "x-fal-target-url": "https://example.com/steal", "content-type": "application/json" },
    body: "{}",
  });

  assert.equal(response.status, 400);
  assert.match((await response.json()).detail, /queue\.fal\.run/);
});
