// The playground page in a real browser: Playwright (playwright-core, pinned in package.json)
// driving Debian's Chromium headless against a live kontext-server.
//
// Run by tests/e2e/test_playground.py, which starts the server and sets:
//   KONTEXT_E2E_URL          http://127.0.0.1:PORT
//   KONTEXT_E2E_IMAGE_FILE   a small PNG file to pick in the page's file input
//   KONTEXT_E2E_SCREENSHOTS  a folder for the screenshots
//   KONTEXT_E2E_CHROMIUM     the browser (default /usr/bin/chromium); never downloaded
// The scenarios run in order in one browser context (the recent-requests list is shared).

import assert from "node:assert/strict";
import path from "node:path";
import { after, before, test } from "node:test";

import { chromium } from "playwright-core";

const BASE = process.env.KONTEXT_E2E_URL;
const IMAGE_FILE = process.env.KONTEXT_E2E_IMAGE_FILE;
const SCREENSHOTS = process.env.KONTEXT_E2E_SCREENSHOTS;
const CHROMIUM = process.env.KONTEXT_E2E_CHROMIUM || "/usr/bin/chromium";
assert.ok(BASE && IMAGE_FILE && SCREENSHOTS, "set KONTEXT_E2E_URL, _IMAGE_FILE and _SCREENSHOTS");

const TIMEOUT_MS = 30_000;
// Root in a container, no GPU, a closed network: the flags the machine notes list.
const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

let browser;
let context;
let page;
const pageErrors = [];
let edited = false; // the later scenarios start from the full edit's result

before(async () => {
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  context.setDefaultTimeout(TIMEOUT_MS);
  page = await context.newPage();
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  page.on("console", (message) => {
    // Chromium also logs every 4xx answer the page handles (the 422 it shows, say).
    if (message.type() === "error" && !message.text().startsWith("Failed to load resource")) {
      pageErrors.push(message.text());
    }
  });
});

after(async () => {
  await browser?.close();
});

/** Whether the server offers uploads (another part of the server; the page falls back). */
async function serverHasUploads() {
  const response = await fetch(`${BASE}/rest/storage/upload/initiate?storage_type=fal-cdn-v3`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ content_type: "image/png", file_name: "probe.png" }),
  });
  return response.status !== 404 && response.status !== 405;
}

/** Records every text #run-status and #queue-position show, however briefly. */
async function recordRunTexts() {
  await page.evaluate(() => {
    window.__seen = [];
    const watch = (id) => {
      const node = document.getElementById(id);
      new MutationObserver(() => {
        if (!node.hidden) window.__seen.push(`${id}: ${node.textContent}`);
      }).observe(node, { childList: true, characterData: true, subtree: true, attributes: true });
    };
    watch("run-status");
    watch("queue-position");
  });
}

/** Waits for a result image; fails at once, with the page's message, when the edit failed. */
async function waitForResultOrError() {
  await page.locator(".result-image, #run-error:not([hidden]), #form-error:not([hidden])").first().waitFor();
  for (const id of ["#run-error", "#form-error"]) {
    const box = page.locator(id);
    if (await box.isVisible()) assert.fail(`the page shows an error: ${await box.textContent()}`);
  }
}

test("the page loads with both endpoints and no script errors", { timeout: TIMEOUT_MS }, async () => {
  const response = await page.goto(`${BASE}/playground`);
  assert.equal(response.status(), 200);
  await page.locator('body[data-ready="true"]').waitFor();
  assert.equal(await page.getByRole("radio", { name: "Kontext Max", exact: true }).isChecked(), true);
  await page.getByRole("radio", { name: "Kontext Max Multi" }).check();
  assert.equal(await page.locator("#aspect_ratio_choice").isVisible(), true, "multi: the ratio enum");
  await page.getByRole("radio", { name: "Kontext Max", exact: true }).check();
  assert.equal(await page.locator("#aspect_ratio").isVisible(), true, "max: a free W:H");
  assert.match(await page.locator("#aspect_ratio-hint").textContent(), /21:9 to 9:21/);
  assert.deepEqual(pageErrors, []);
});

test("an image is sent inline when the server refuses the upload", { timeout: TIMEOUT_MS }, async () => {
  const initiate = "**/rest/storage/upload/initiate*";
  await page.route(initiate, (route) => route.fulfill({ status: 503, json: { detail: "uploads are down" } }));
  await page.locator("#file-input").setInputFiles(IMAGE_FILE);
  const item = page.locator('.image-item[data-status="ready"]');
  await item.waitFor();
  assert.equal(await item.getAttribute("data-via"), "inline");
  assert.match(await item.locator(".image-state").getAttribute("title"), /uploads are down/);
  await page.unroute(initiate);
  await item.getByRole("button", { name: /^Remove/ }).click();
  assert.equal(await page.locator(".image-item").count(), 0);
});

test("a validation error is shown next to its field", { timeout: TIMEOUT_MS }, async () => {
  await page.locator("#file-input").setInputFiles(IMAGE_FILE);
  const item = page.locator(".image-item");
  await item.and(page.locator('[data-status="ready"]')).waitFor();
  const expectedVia = (await serverHasUploads()) ? "upload" : "inline";
  assert.equal(await item.getAttribute("data-via"), expectedVia, await item.textContent());

  await page.getByRole("textbox", { name: "Prompt" }).fill("Put a donut next to the flour.");
  await page.getByRole("combobox", { name: "Aspect ratio" }).fill("string");
  await page.getByRole("button", { name: "Edit image" }).click();

  const error = page.locator("#aspect_ratio-error");
  await error.waitFor({ state: "visible" });
  assert.match(await error.textContent(), /aspect_ratio must be a ratio W:H between 21:9 and 9:21/);
  assert.match(await error.textContent(), /'string'/);
  assert.equal(await page.locator("#aspect_ratio").getAttribute("aria-invalid"), "true");
  assert.equal(await page.locator("#run").isHidden(), true, "nothing was submitted");
  assert.equal(await page.locator("#prompt-error").isHidden(), true, "only the wrong field is marked");
});

test("a full edit shows progress, logs and a result of the reported size", { timeout: TIMEOUT_MS }, async () => {
  await page.getByRole("combobox", { name: "Aspect ratio" }).fill("");
  await page.getByRole("textbox", { name: "Seed" }).fill("1234");
  await recordRunTexts();
  await page.getByRole("button", { name: "Edit image" }).click();

  assert.equal(await page.locator("#aspect_ratio-error").isHidden(), true, "the old error is cleared");
  const image = page.locator(".result-image");
  await waitForResultOrError();
  await page.waitForFunction(() => document.querySelector(".result-image")?.complete);
  const size = await image.evaluate((img) => ({
    natural: [img.naturalWidth, img.naturalHeight],
    reported: [Number(img.dataset.width), Number(img.dataset.height)],
  }));
  assert.ok(size.natural[0] > 0, "the result image did not load");
  assert.deepEqual(size.natural, size.reported);
  const caption = await page.locator(".result-card figcaption").textContent();
  assert.ok(caption.includes(`${size.reported[0]} × ${size.reported[1]} px`), caption);
  assert.ok(caption.includes("seed 1234"), caption);

  const seen = await page.evaluate(() => window.__seen);
  assert.ok(seen.some((text) => text.startsWith("queue-position: ")), `no queue position: ${seen}`);
  assert.ok(seen.includes("run-status: Running"), `never shown running: ${seen}`);
  assert.equal(await page.locator("#run-status").textContent(), "Completed");
  assert.match(await page.locator("#progress-text").textContent(), /^step (\d+)\/\1$/);
  const logs = await page.locator("#logs").textContent();
  assert.match(logs, /step \d+\/\d+/, "no live step logs");

  const download = page.getByRole("link", { name: "Download" });
  assert.equal(await download.getAttribute("href"), await image.getAttribute("src"));
  assert.match(await download.getAttribute("download"), /\.jpe?g$/);
  assert.equal(await page.locator("#cancel-button").isHidden(), true);
  const history = page.locator(".history-item");
  assert.equal(await history.count(), 1);
  assert.match(await history.first().textContent(), /done/);

  await page.screenshot({ path: path.join(SCREENSHOTS, "playground-result.png"), fullPage: true });
  edited = true;
});

// Also the page's other paths: Max Multi with several images and the ratio enum, and, with an
// API key entered, every call sending it and the status stream read through fetch (the server
// has no keys, so it ignores the header).
test("a multi edit of the result and a new image can be cancelled while it runs", { timeout: TIMEOUT_MS }, async () => {
  assert.ok(edited, "needs the result of the full edit (failed above)");
  const resultUrl = await page.locator(".result-image").getAttribute("src");
  await page.getByRole("button", { name: "Edit this result again" }).click();
  const inputs = page.locator(".image-item");
  assert.equal(await inputs.count(), 1);
  assert.equal(await inputs.getAttribute("data-via"), "result");
  assert.equal(await inputs.locator("img").getAttribute("src"), resultUrl);

  await page.getByRole("radio", { name: "Kontext Max Multi" }).check();
  await page.locator("#file-input").setInputFiles(IMAGE_FILE);
  await page.locator('.image-item[data-status="ready"]').nth(1).waitFor();
  assert.equal(await inputs.count(), 2);
  await page.getByRole("combobox", { name: "Aspect ratio" }).selectOption("1:1");
  await page.getByText("API key").click();
  await page.getByLabel("Key", { exact: true }).fill("e2e-key:any-secret");
  await page.getByRole("textbox", { name: "Prompt" }).fill("Make the donut blue.");
  const sent = [];
  const record = (request) => sent.push([new URL(request.url()).pathname, request.headers().authorization]);
  page.on("request", record);
  await page.getByRole("button", { name: "Edit image" }).click();

  await page.locator("#run-status", { hasText: "Running" }).waitFor();
  assert.equal(await page.locator("#run-endpoint").getAttribute("title"), "fal-ai/flux-pro/kontext/max/multi");
  await page.getByRole("button", { name: "Cancel" }).click();

  await page.locator("#run-status", { hasText: "Cancelled" }).waitFor();
  assert.match(await page.locator("#run-error").textContent(), /client_cancelled/);
  assert.equal(await page.locator(".result-image").count(), 0);
  assert.equal(await page.locator("#cancel-button").isHidden(), true);
  assert.match(await page.locator(".history-item").first().textContent(), /cancelled/);
  page.off("request", record);
  const streams = sent.filter(([pathname]) => pathname.endsWith("/status/stream"));
  assert.ok(streams.length > 0, `no status stream: ${JSON.stringify(sent)}`);
  for (const [pathname, authorization] of sent) {
    assert.equal(authorization, "Key e2e-key:any-secret", `${pathname} went without the key`);
  }
});

test("recent requests survive a reload and reopen with their result", { timeout: TIMEOUT_MS }, async () => {
  assert.ok(edited, "needs the result of the full edit (failed above)");
  await page.setViewportSize({ width: 420, height: 900 });
  await page.reload();
  await page.locator('body[data-ready="true"]').waitFor();
  const items = page.locator(".history-item");
  assert.equal(await items.count(), 2);
  await items.nth(1).getByRole("button", { name: /Reopen/ }).click();

  await waitForResultOrError();
  assert.equal(await page.getByRole("textbox", { name: "Prompt" }).inputValue(), "Put a donut next to the flour.");
  assert.equal(await page.getByRole("textbox", { name: "Seed" }).inputValue(), "1234");
  assert.equal(await page.locator("#run-status").textContent(), "Completed");
  assert.match(await page.locator("#logs").textContent(), /step \d+\/\d+/);
  await page.screenshot({ path: path.join(SCREENSHOTS, "playground-narrow.png"), fullPage: true });
  assert.deepEqual(pageErrors, []);
});
