// The fleet dashboard in a real headless Chromium (Debian's `chromium`,
// driven by playwright-core). tests/tests/dashboard.rs starts a fleet
// server with 1,000 simulated devices and runs this file with:
//   EDGEFLEET_URL          the server's base URL
//   EDGEFLEET_ADMIN_TOKEN  an admin operator token
//   EDGEFLEET_READ_TOKEN   a read-only operator token
//   EDGEFLEET_DEVICES      how many devices the fleet has
//   CHROMIUM               the browser binary (default /usr/bin/chromium)
//   SCREENSHOT_DIR         where the page screenshots go (default: none; the
//                          Rust test passes a temporary dir, or docs/screenshots/
//                          with EDGEFLEET_UPDATE_SCREENSHOTS=1)
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

const URL = process.env.EDGEFLEET_URL;
const ADMIN = process.env.EDGEFLEET_ADMIN_TOKEN;
const READ = process.env.EDGEFLEET_READ_TOKEN;
const DEVICES = Number(process.env.EDGEFLEET_DEVICES || 0);
const SHOTS = process.env.SCREENSHOT_DIR;
assert.ok(URL && ADMIN && READ, "EDGEFLEET_URL, EDGEFLEET_ADMIN_TOKEN and EDGEFLEET_READ_TOKEN must be set");

const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };
let browser;

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });
  if (SHOTS) mkdirSync(SHOTS, { recursive: true });
});

after(async () => {
  await browser?.close();
});

async function loggedIn(token, viewport = DESKTOP, colorScheme = "light") {
  const context = await browser.newContext({ viewport, colorScheme });
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") problems.push(`console: ${m.text()}`); });
  await page.goto(`${URL}/ui/`);
  assert.match(new globalThis.URL(page.url()).pathname, /^\/ui\/login$/, "a visitor without a session is sent to the login page");
  await page.getByLabel("Operator token").fill(token);
  await page.getByRole("button", { name: "Log in" }).click();
  await page.waitForURL(`${URL}/ui/`);
  return { context, page, problems };
}

async function shot(page, name) {
  if (!SHOTS) return;
  // Desktop pages whole, phone pages as the first screen shows them.
  const fullPage = page.viewportSize().width >= DESKTOP.width;
  await page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage });
}

// Reloads until `check` passes (data arrives over MQTT in the background).
async function eventually(page, what, check, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    try {
      if (await check()) return;
    } catch (e) {
      last = e;
    }
    await page.waitForTimeout(1000);
    await page.reload();
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ""}`);
}

const points = async (page, chart) => Number(await page.locator(`#${chart}`).getAttribute("data-points"));

test("a wrong token is refused with a message, and actions need a session and its CSRF token", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${URL}/ui/login`);
  await page.getByLabel("Operator token").fill("eft_0000000000000000_" + "0".repeat(64));
  await page.getByRole("button", { name: "Log in" }).click();
  await assert.doesNotReject(page.getByRole("alert").filter({ hasText: "Unknown or revoked operator token" }).waitFor());
  // No session at all.
  const anonymous = await page.request.post(`${URL}/api/v1/rollouts/any/pause`, { failOnStatusCode: false });
  assert.equal(anonymous.status(), 401);
  await context.close();

  // A session, but no CSRF token: refused before the action runs.
  const { context: admin, page: adminPage } = await loggedIn(ADMIN);
  const noCsrf = await adminPage.request.post(`${URL}/api/v1/rollouts/any/pause`, { failOnStatusCode: false });
  assert.equal(noCsrf.status(), 403);
  assert.match((await noCsrf.json()).error, /CSRF/);
  const csrf = await adminPage.locator('meta[name="csrf-token"]').getAttribute("content");
  const withCsrf = await adminPage.request.post(`${URL}/api/v1/rollouts/no-such-rollout/pause`, {
    headers: { "X-CSRF-Token": csrf }, failOnStatusCode: false,
  });
  assert.equal(withCsrf.status(), 404, "with the token the call goes through (to a rollout that does not exist)");
  // After logging out the cookie is worthless.
  await adminPage.getByRole("button", { name: "Log out" }).click();
  await adminPage.waitForURL(/\/ui\/login$/);
  const afterLogout = await adminPage.request.post(`${URL}/api/v1/rollouts/any/pause`, {
    headers: { "X-CSRF-Token": csrf }, failOnStatusCode: false,
  });
  assert.equal(afterLogout.status(), 401);
  await admin.close();
});

test("the overview shows the whole fleet, within the time budget", async () => {
  const { context, page, problems } = await loggedIn(ADMIN);
  await eventually(page, "every device online with telemetry", async () => {
    const stats = await page.locator("#summary .stat .n").allTextContents();
    return Number(stats[0]) === DEVICES && Number(stats[1]) === DEVICES
      && (await points(page, "fleet-volume")) > 0;
  });
  // Hardware classes from enrollment, devices needing attention (the
  // simulator makes a few hot, full or backlogged).
  const hardware = await page.locator("#compliance table").first().locator("tbody th").allTextContents();
  assert.deepEqual(hardware.sort(), ["jetson-orin", "rpi-zero2", "rpi4"]);
  const attention = await page.locator("#attention tbody tr").count();
  assert.ok(attention > 0, "some simulated devices need attention");
  const reasons = (await page.locator("#attention").textContent()) || "";
  assert.match(reasons, /hot: \d+ °C|disk nearly full|outbox backlog growing/);

  // Budget: a fresh load of the overview of the whole fleet.
  const runs = [];
  for (let i = 0; i < 5; i++) {
    const started = Date.now();
    await page.goto(`${URL}/ui/`, { waitUntil: "load" });
    runs.push(Date.now() - started);
  }
  const timing = await page.evaluate(() => {
    const nav = performance.getEntriesByType("navigation")[0];
    const resources = performance.getEntriesByType("resource");
    return {
      html: nav.transferSize || nav.encodedBodySize,
      total: (nav.transferSize || nav.encodedBodySize) + resources.reduce((n, r) => n + (r.transferSize || r.encodedBodySize), 0),
      domContentLoaded: nav.domContentLoadedEventEnd,
      load: nav.loadEventEnd,
    };
  });
  runs.sort((a, b) => a - b);
  const median = runs[2];
  console.log(`overview with ${DEVICES} devices: load ${runs.join("/")} ms (median ${median} ms; navigation timing load ${timing.load.toFixed(0)} ms), HTML ${timing.html} B, page weight ${timing.total} B`);
  assert.ok(median < 1000, `the overview must load in under 1 s; median ${median} ms`);
  assert.ok(timing.total < 200_000, `page weight ${timing.total} B over the 200 kB budget`);

  // Keyboard: the first Tab reaches the skip link, which leads to main.
  await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement.textContent), "Skip to content");
  assert.deepEqual(problems, []);
  await context.close();

  const dark = await loggedIn(ADMIN, DESKTOP, "dark");
  await shot(dark.page, "overview-dark");
  await dark.context.close();
  const phone = await loggedIn(ADMIN, PHONE);
  const width = await phone.page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(width <= PHONE.width, `the overview fits a phone's width (${width} px)`);
  await shot(phone.page, "overview-phone");
  await phone.context.close();
});

test("the devices table searches, filters and pages; a device page has its charts", async () => {
  const { context, page, problems } = await loggedIn(ADMIN);
  await page.goto(`${URL}/ui/devices`);
  assert.match(await page.locator(".count").textContent(), new RegExp(`of ${DEVICES} devices`));
  assert.equal(await page.locator("table.devices tbody tr").count(), 50, "50 per page");
  await page.getByRole("link", { name: "Next →" }).click();
  await page.waitForURL(/page=1/);
  await page.getByLabel("Search id or tag").fill("sim-0001");
  await page.getByLabel("Hardware").selectOption("rpi4");
  await page.getByRole("button", { name: "Filter" }).click();
  await page.waitForURL(/q=sim-0001/);
  const ids = await page.locator("table.devices tbody th a").allTextContents();
  assert.ok(ids.length > 0 && ids.length < 10, `${ids.length} matches`);
  for (const id of ids) assert.ok(id.startsWith("sim-0001"), id);
  await shot(page, "devices-desktop");

  await page.getByRole("link", { name: ids[0] }).click();
  await page.waitForURL(`${URL}/ui/devices/${ids[0]}`);
  await page.getByRole("heading", { name: ids[0] }).waitFor();
  await eventually(page, "device charts", async () =>
    (await points(page, "cpu")) >= 2 && (await points(page, "temperature")) >= 2 && (await points(page, "memory")) >= 2);
  assert.match(await page.locator("#device-facts").textContent(), /rpi4/);
  await shot(page, "device-desktop");
  const phone = await loggedIn(ADMIN, PHONE);
  await phone.page.goto(`${URL}/ui/devices/${ids[0]}`);
  await shot(phone.page, "device-phone");
  await phone.context.close();
  assert.deepEqual(problems, []);
  await context.close();
});

test("a rollout is created, started and paused from the UI; a read-only operator sees no buttons", async () => {
  const { context, page, problems } = await loggedIn(ADMIN);
  page.on("dialog", (dialog) => dialog.accept());
  await page.goto(`${URL}/ui/rollouts`);
  await page.getByLabel("Name").fill("ui-digits-1");
  await page.getByLabel("Model version").selectOption("digits@1");
  await page.getByLabel("Waves (cumulative)").fill("10, 50%, 100%");
  await page.getByLabel("Soak per wave (s)").fill("30");
  await page.getByRole("button", { name: "Create rollout" }).click();
  await page.waitForURL(`${URL}/ui/rollouts/ui-digits-1`);
  assert.equal((await page.locator(".badge.phase").textContent()).trim(), "created");

  await page.getByRole("button", { name: "Start" }).click();
  // The live refresh after the call shows the new phase without a reload.
  await page.locator(".badge.phase", { hasText: "running" }).waitFor({ timeout: 15_000 });
  // Wave 1's devices update (the simulator answers within a second or two).
  await page.waitForFunction(() => {
    const cells = [...document.querySelectorAll("#rollout-state tbody tr:first-child td")].map((td) => td.textContent);
    return Number(cells[4]) >= 1; // confirmed in wave 1
  }, null, { timeout: 60_000, polling: 500 });
  await page.getByRole("button", { name: "Pause" }).click();
  await page.locator(".badge.phase", { hasText: "paused" }).waitFor({ timeout: 15_000 });
  assert.match(await page.locator("#rollout-state").textContent(), /Paused: paused by an operator/);
  assert.equal(await page.getByRole("button", { name: "Resume" }).count(), 1);
  await shot(page, "rollout-desktop");

  // A device of wave 1 now runs digits@1: its page shows inference charts.
  const status = await (await page.request.get(`${URL}/api/v1/rollouts/ui-digits-1`)).json();
  const moved = Object.entries(status.devices).find(([, s]) => s.state === "confirmed")[0];
  await page.goto(`${URL}/ui/devices/${moved}`);
  await eventually(page, "latency chart of digits@1", async () => (await points(page, "latency-0")) >= 1);
  assert.match(await page.locator("h2", { hasText: "Inference" }).first().textContent(), /digits@1/);

  await page.goto(`${URL}/ui/models`);
  const row = page.locator("#model-list tbody tr", { hasText: "digits" }).filter({ has: page.locator("td.num", { hasText: /^1$/ }) });
  assert.match(await row.textContent(), /[1-9]\d* devices/);
  await shot(page, "models-desktop");
  await page.goto(`${URL}/ui/rollouts`);
  await shot(page, "rollouts-desktop");
  // The overview again, now with a model running and inference traffic.
  await page.goto(`${URL}/ui/`);
  await page.locator("#compliance td.num a").first().waitFor();
  await shot(page, "overview-desktop");
  assert.deepEqual(problems, []);
  await context.close();

  const reader = await loggedIn(READ);
  await reader.page.goto(`${URL}/ui/rollouts/ui-digits-1`);
  assert.equal(await reader.page.locator("button[data-api]").count(), 0, "no action buttons for a read-only token");
  await reader.page.goto(`${URL}/ui/rollouts`);
  assert.equal(await reader.page.locator("#new-rollout").count(), 0);
  // And the API refuses it even with a valid session and CSRF token.
  const csrf = await reader.page.locator('meta[name="csrf-token"]').getAttribute("content");
  const refused = await reader.page.request.post(`${URL}/api/v1/rollouts/ui-digits-1/resume`, {
    headers: { "X-CSRF-Token": csrf }, failOnStatusCode: false,
  });
  assert.equal(refused.status(), 403);
  await reader.context.close();
});
