// The official JS client (@fal-ai/client, pinned in package.json) against a live kontext-server.
//
// Run by tests/e2e/test_fal_client_js.py, which starts the server and sets:
//   KONTEXT_E2E_URL    http://127.0.0.1:PORT (the server's queue base; /run/ is its run base)
//   KONTEXT_E2E_IMAGE  a small PNG as a data: URI (the worker needs no network)
// By hand: KONTEXT_E2E_URL=... KONTEXT_E2E_IMAGE=... node --test fal_client.test.mjs
//
// The client's hosts are hard-coded; requestMiddleware rewrites them to the server
// (PROTOCOL.md §1). Authentication is off on loopback with no keys, so any key string works.

import assert from "node:assert/strict";
import { test } from "node:test";

import { ApiError, ValidationError, createFalClient } from "@fal-ai/client";

const BASE = process.env.KONTEXT_E2E_URL;
const IMAGE = process.env.KONTEXT_E2E_IMAGE;
assert.ok(BASE, "set KONTEXT_E2E_URL to the server's base URL");
assert.ok(IMAGE, "set KONTEXT_E2E_IMAGE to an image data: URI");

const ENDPOINT = "fal-ai/flux-pro/kontext/max";
const STATUSES = new Set(["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]);
const STEP_LOG = /^step \d+\/\d+$/;
const TIMEOUT_MS = 60_000;

const REWRITES = [
  ["https://queue.fal.run/", `${BASE}/`],
  ["https://fal.run/", `${BASE}/run/`],
  ["https://rest.fal.ai/", `${BASE}/rest/`],
];

function toServer(url) {
  for (const [from, to] of REWRITES) {
    if (url.startsWith(from)) return to + url.slice(from.length);
  }
  throw new Error(`the client called an unexpected host: ${url}`);
}

const fal = createFalClient({
  credentials: "e2e-any-key",
  requestMiddleware: async (request) => ({ ...request, url: toServer(request.url) }),
});

function input(extra = {}) {
  return { prompt: "Put a donut next to the flour.", image_url: IMAGE, ...extra };
}

/** Width and height from a JPEG's start-of-frame segment. */
function jpegSize(bytes) {
  assert.equal(bytes[0], 0xff);
  assert.equal(bytes[1], 0xd8, "not a JPEG");
  let offset = 2;
  while (offset < bytes.length) {
    assert.equal(bytes[offset], 0xff, "broken JPEG marker");
    const marker = bytes[offset + 1];
    const length = (bytes[offset + 2] << 8) | bytes[offset + 3];
    if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
      const height = (bytes[offset + 5] << 8) | bytes[offset + 6];
      const width = (bytes[offset + 7] << 8) | bytes[offset + 8];
      return { width, height };
    }
    offset += 2 + length;
  }
  throw new Error("no start-of-frame segment in JPEG");
}

async function assertImageMatchesFile(image) {
  assert.ok(image.url.startsWith(`${BASE}/`), `image URL ${image.url} is not on ${BASE}`);
  const response = await fetch(image.url);
  assert.equal(response.status, 200);
  assert.equal(response.headers.get("content-type").split(";")[0], "image/jpeg");
  const bytes = new Uint8Array(await response.arrayBuffer());
  assert.equal(bytes.length, image.file_size);
  assert.deepEqual(jpegSize(bytes), { width: image.width, height: image.height });
}

function logMessages(updates) {
  const messages = [];
  for (const update of updates) {
    for (const entry of update.logs ?? []) {
      for (const key of ["message", "level", "source", "timestamp"]) {
        assert.ok(key in entry, `log entry without ${key}: ${JSON.stringify(entry)}`);
      }
      messages.push(entry.message);
    }
  }
  return messages;
}

async function waitUntilCompleted(requestId) {
  const deadline = Date.now() + TIMEOUT_MS;
  for (;;) {
    const status = await fal.queue.status(ENDPOINT, { requestId, logs: true });
    assert.ok(STATUSES.has(status.status), `unexpected status ${status.status}`);
    if (status.status === "COMPLETED") return status;
    assert.ok(Date.now() < deadline, `request ${requestId} did not complete`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Submit a request so that the next one waits in line (the server runs one worker). */
async function submitBlocker() {
  return (await fal.queue.submit(ENDPOINT, { input: input() })).request_id;
}

test("subscribe in polling mode reports queue and progress, then returns the result", { timeout: TIMEOUT_MS }, async () => {
  const blocker = await submitBlocker();
  const updates = [];
  let enqueuedId;

  const result = await fal.subscribe(ENDPOINT, {
    input: input({ seed: 42 }),
    logs: true,
    pollInterval: 50,
    onEnqueue: (id) => {
      enqueuedId = id;
    },
    onQueueUpdate: (update) => updates.push(update),
  });

  assert.ok(updates.every((u) => STATUSES.has(u.status)));
  assert.ok(updates.some((u) => u.status === "IN_QUEUE" && Number.isInteger(u.queue_position)));
  const running = updates.filter((u) => u.status === "IN_PROGRESS");
  assert.ok(running.length > 0, "never saw IN_PROGRESS");
  assert.ok(logMessages(running).some((m) => STEP_LOG.test(m)), "no step progress in the logs");
  assert.equal(updates.at(-1).status, "COMPLETED");
  assert.equal(result.requestId, enqueuedId);
  assert.equal(result.data.seed, 42);
  assert.deepEqual(result.data.has_nsfw_concepts, [false]);
  assert.equal(result.data.images.length, 1);
  await assertImageMatchesFile(result.data.images[0]);
  await waitUntilCompleted(blocker);
});

test("subscribe in streaming mode ends with COMPLETED and returns the result", { timeout: TIMEOUT_MS }, async () => {
  const blocker = await submitBlocker();
  const updates = [];

  const result = await fal.subscribe(ENDPOINT, {
    input: input({ seed: 43 }),
    mode: "streaming",
    logs: true,
    onQueueUpdate: (update) => updates.push(update),
  });

  assert.ok(updates.length > 0, "no status events on the stream");
  assert.ok(updates.every((u) => STATUSES.has(u.status)));
  assert.equal(updates.at(-1).status, "COMPLETED");
  assert.ok(updates.some((u) => u.status !== "COMPLETED"), "stream showed only the end");
  assert.ok(logMessages(updates).some((m) => STEP_LOG.test(m)), "no step progress in the logs");
  assert.equal(result.data.seed, 43);
  await assertImageMatchesFile(result.data.images[0]);
  await waitUntilCompleted(blocker);
});

test("submit, status and result by request id", { timeout: TIMEOUT_MS }, async () => {
  const submitted = await fal.queue.submit(ENDPOINT, { input: input({ seed: 44 }) });

  assert.equal(submitted.status, "IN_QUEUE");
  assert.ok(Number.isInteger(submitted.queue_position));
  for (const key of ["request_id", "status_url", "response_url", "cancel_url"]) {
    assert.ok(submitted[key], `submit answer without ${key}`);
  }
  const final = await waitUntilCompleted(submitted.request_id);
  assert.ok(!final.error, `failed: ${final.error}`);
  assert.ok(logMessages([final]).includes("step 2/2"));
  const result = await fal.queue.result(ENDPOINT, { requestId: submitted.request_id });
  assert.equal(result.requestId, submitted.request_id);
  assert.equal(result.data.seed, 44);
  await assertImageMatchesFile(result.data.images[0]);
});

test("cancel of a queued request completes it as cancelled", { timeout: TIMEOUT_MS }, async () => {
  const blocker = await submitBlocker();
  const { request_id: requestId } = await fal.queue.submit(ENDPOINT, { input: input() });
  const before = await fal.queue.status(ENDPOINT, { requestId });
  assert.equal(before.status, "IN_QUEUE");

  await fal.queue.cancel(ENDPOINT, { requestId });
  const after = await fal.queue.status(ENDPOINT, { requestId, logs: true });

  assert.equal(after.status, "COMPLETED");
  assert.equal(after.error_type, "client_cancelled");
  await assert.rejects(fal.queue.result(ENDPOINT, { requestId }), (error) => {
    assert.ok(error instanceof ApiError);
    assert.ok(error.status >= 400);
    return true;
  });
  const final = await waitUntilCompleted(blocker);
  assert.ok(!final.error, `the other request failed: ${final.error}`);
});

test("a start timeout ends the request with a user timeout that is not retried", { timeout: TIMEOUT_MS }, async () => {
  // Two requests ahead on the one worker take longer than the 1.1 s allowed to start.
  const blockers = [await submitBlocker(), await submitBlocker()];
  const { request_id: requestId } = await fal.queue.submit(ENDPOINT, {
    input: input(),
    startTimeout: 1.1,
  });

  const final = await waitUntilCompleted(requestId);
  const askedAt = Date.now();
  await assert.rejects(fal.queue.result(ENDPOINT, { requestId }), (error) => {
    assert.ok(error instanceof ApiError, `not an ApiError: ${error}`);
    assert.equal(error.status, 504);
    // fal marks these 504s with x-fal-request-timeout-type: user; without it the client
    // retries the call (and would re-submit a /run/ request).
    assert.ok(error.isUserTimeout, "504 without x-fal-request-timeout-type: user");
    return true;
  });

  assert.equal(final.error_type, "request_timeout");
  assert.ok(Date.now() - askedAt < 900, "the client retried the result call");
  for (const blocker of blockers) await waitUntilCompleted(blocker);
});

test("an invalid aspect_ratio is a ValidationError naming what is allowed", { timeout: TIMEOUT_MS }, async () => {
  await assert.rejects(
    fal.queue.submit(ENDPOINT, { input: input({ aspect_ratio: "string" }) }),
    (error) => {
      assert.ok(error instanceof ValidationError, `not a ValidationError: ${error}`);
      assert.equal(error.status, 422);
      const [fieldError] = error.getFieldErrors("aspect_ratio");
      assert.ok(fieldError, `no aspect_ratio error in ${JSON.stringify(error.body)}`);
      assert.match(fieldError.msg, /21:9/);
      return true;
    },
  );
});

test("run answers synchronously under /run/", { timeout: TIMEOUT_MS }, async () => {
  const result = await fal.run(ENDPOINT, { input: input({ seed: 45 }) });

  assert.equal(result.data.seed, 45);
  assert.ok(result.requestId, "no x-fal-request-id header on the run answer");
  await assertImageMatchesFile(result.data.images[0]);
});
