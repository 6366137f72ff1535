// Real-browser test of the Swagger UI served at /docs.
//
// Driven by scripts/browser-test.sh, which starts the service and provides:
//   BASE_URL   e.g. http://127.0.0.1:40123 (the service under test)
//   DB_NAME    the PostgreSQL database the service writes to
//   PGHOST / PGPORT / PGUSER   how to reach it with psql (defaults 127.0.0.1 / 5432 / postgres)
//   CHROMIUM   the browser binary (default /usr/bin/chromium; never downloaded)
//   KEY_FILE   optional: the counter key used is written there for the caller
//
// Every request to a host other than 127.0.0.1/localhost is blocked, so a pass
// shows that the page needs no internet.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

import { chromium } from 'playwright-core';

const execFileP = promisify(execFile);

const BASE_URL = (process.env.BASE_URL ?? '').replace(/\/+$/, '');
const DB_NAME = process.env.DB_NAME ?? '';
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const PG = {
  host: process.env.PGHOST ?? '127.0.0.1',
  port: process.env.PGPORT ?? '5432',
  user: process.env.PGUSER ?? 'postgres',
};
const TEST_TIMEOUT_MS = Number(process.env.TEST_TIMEOUT_MS ?? 120_000);
const STEP_TIMEOUT_MS = 15_000;
const DB_POLL_TIMEOUT_MS = 15_000;

const LOCAL_HOSTS = new Set(['127.0.0.1', 'localhost', '[::1]']);
// Operations that must be listed on the page.
const EXPECTED_OPERATIONS = [
  ['POST', '/increment'],
  ['POST', '/increments'],
  ['GET', '/counters/{key}'],
  ['GET', '/counters'],
  ['GET', '/healthz'],
];

if (!BASE_URL || !DB_NAME) {
  console.error('BASE_URL and DB_NAME must be set (run scripts/browser-test.sh)');
  process.exit(2);
}

const key = `browser:${Date.now().toString(36)}-${randomBytes(4).toString('hex')}`;
const VALUE = 7;

const checks = [];
let gaveUp = false; // set when the watchdog fires; a still-running step stays quiet
function ok(message) {
  if (gaveUp) return;
  checks.push(message);
  console.log(`  ok ${checks.length} - ${message}`);
}

// --- browser -----------------------------------------------------------------

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'increment-chromium-profile-'));
const blocked = []; // { url, resourceType }
const pageErrors = [];
const consoleErrors = [];

let context;
let page;

async function saveFailureArtifacts() {
  if (!page) return;
  try {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'increment-swagger-failure-'));
    const shot = path.join(dir, 'screenshot.png');
    await page.screenshot({ path: shot, fullPage: true, timeout: 10_000 });
    fs.writeFileSync(path.join(dir, 'page.html'), await page.content());
    console.error(`  screenshot: ${shot}`);
    console.error(`  page HTML:  ${path.join(dir, 'page.html')}`);
  } catch (err) {
    console.error(`  (could not save a screenshot: ${err.message})`);
  }
}

async function closeBrowser() {
  if (context) {
    await context.close().catch(() => {});
    context = undefined;
  }
  try {
    fs.rmSync(userDataDir, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 });
  } catch (err) {
    console.error(`  (could not remove ${userDataDir}: ${err.message})`);
  }
}

// --- helpers -----------------------------------------------------------------

/** The operation block of `method path`, e.g. ('post', '/increment'). */
function operation(method, apiPath) {
  return page
    .locator(`.opblock.opblock-${method.toLowerCase()}`)
    .filter({ has: page.locator(`.opblock-summary-path[data-path="${apiPath}"]`) });
}

/** Expands an operation (if collapsed) and clicks "Try it out". */
async function openTryItOut(op) {
  assert.equal(await op.count(), 1, 'exactly one such operation block');
  const summary = op.locator('.opblock-summary-control');
  if ((await summary.getAttribute('aria-expanded')) !== 'true') {
    await summary.click();
  }
  await op.locator('.opblock-body').waitFor();
  const tryOut = op.locator('button.try-out__btn');
  await tryOut.waitFor();
  assert.match((await tryOut.innerText()).trim(), /^Try it out$/i);
  await tryOut.click();
  // The button turns into "Cancel" and "Execute" appears.
  await op.locator('button.try-out__btn.cancel').waitFor();
  await op.locator('button.execute').waitFor();
}

/**
 * Clicks "Execute" and returns what the page shows as the server response:
 * { status, body } read from the live responses table, plus the network status.
 */
async function execute(op, method, pathPattern) {
  const [response] = await Promise.all([
    page.waitForResponse(
      (r) => r.request().method() === method && pathPattern.test(new URL(r.url()).pathname),
    ),
    op.locator('button.execute').click(),
  ]);
  const live = op.locator('.live-responses-table');
  const statusCell = live.locator('tbody tr.response .response-col_status').first();
  await statusCell.waitFor();
  const status = (await statusCell.innerText()).trim();
  // The body is rendered in a <pre> inside .highlight-code (next to a "Download" button).
  const bodyBlock = live.locator('.response-col_description .highlight-code pre').first();
  const body = (await bodyBlock.count()) > 0 ? (await bodyBlock.innerText()).trim() : '';
  return { networkStatus: response.status(), status, body };
}

function sqlLiteral(s) {
  return `'${s.replaceAll("'", "''")}'`;
}

async function psql(sql) {
  const { stdout } = await execFileP(
    'psql',
    ['-h', PG.host, '-p', PG.port, '-U', PG.user, '-d', DB_NAME, '-v', 'ON_ERROR_STOP=1', '-Atc', sql],
    { timeout: 10_000, env: { ...process.env, PGCONNECT_TIMEOUT: '5' } },
  );
  return stdout.trim();
}

/** Polls the database until the counter's stored value is `expected` (or times out). */
async function waitForStoredValue(counterKey, expected) {
  const sql = `select value from counters where key = ${sqlLiteral(counterKey)}`;
  const deadline = Date.now() + DB_POLL_TIMEOUT_MS;
  let last = '';
  let polls = 0;
  const started = Date.now();
  while (Date.now() < deadline) {
    polls += 1;
    try {
      last = await psql(sql);
    } catch (err) {
      // Keep polling through a transient failure; report the last one.
      last = `psql failed: ${err.stderr?.trim() || err.message}`;
    }
    if (last === String(expected)) return { polls, ms: Date.now() - started };
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail(
    `counters.value for ${counterKey} in ${DB_NAME} is ${JSON.stringify(last)} after ${DB_POLL_TIMEOUT_MS} ms, expected ${expected}`,
  );
}

// --- the test ----------------------------------------------------------------

async function run() {
  console.log(`Swagger UI browser test: ${BASE_URL}/docs, database ${DB_NAME}, key ${key}`);

  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-quic',
      '--no-first-run',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 1280, height: 1000 },
    timeout: 30_000,
  });
  context.setDefaultTimeout(STEP_TIMEOUT_MS);
  const version = context.browser()?.version() ?? '(version unknown)';
  ok(`launched ${CHROMIUM} headless (${version}), fresh profile ${userDataDir}`);

  // No internet: abort everything that does not go to the service on loopback.
  await context.route('**/*', (route) => {
    const request = route.request();
    const url = new URL(request.url());
    if (url.protocol === 'data:' || url.protocol === 'blob:' || LOCAL_HOSTS.has(url.hostname)) {
      return route.continue();
    }
    blocked.push({ url: request.url(), resourceType: request.resourceType() });
    return route.abort('internetdisconnected');
  });

  page = context.pages()[0] ?? (await context.newPage());
  page.on('pageerror', (err) => pageErrors.push(err.message));
  page.on('console', (msg) => {
    if (msg.type() === 'error') consoleErrors.push(msg.text());
  });

  const docs = await page.goto(`${BASE_URL}/docs`, { waitUntil: 'load' });
  assert.equal(docs?.status(), 200, 'GET /docs status');
  ok('GET /docs answered 200');

  // Swagger UI rendered: the info block and at least one operation.
  await page.locator('.swagger-ui .info .title').waitFor();
  await page.locator('.swagger-ui .opblock').first().waitFor();
  const title = (await page.locator('.swagger-ui .info .title').innerText()).trim();
  assert.match(title, /increment/i, 'the page title shows the API name');
  ok(`Swagger UI rendered (title: ${JSON.stringify(title.replace(/\s+/g, ' '))})`);

  // The operations are listed.
  const listed = await page.$$eval('.swagger-ui .opblock .opblock-summary', (nodes) =>
    nodes.map((n) => {
      const method = n.querySelector('.opblock-summary-method')?.textContent?.trim() ?? '';
      const p = n.querySelector('.opblock-summary-path')?.getAttribute('data-path') ?? '';
      return `${method} ${p}`;
    }),
  );
  for (const [method, apiPath] of EXPECTED_OPERATIONS) {
    assert.ok(listed.includes(`${method} ${apiPath}`), `${method} ${apiPath} is listed; listed: ${listed.join(', ')}`);
  }
  ok(`operations listed: ${listed.join(', ')}`);

  // POST /increment through "Try it out".
  const postIncrement = operation('post', '/increment');
  await openTryItOut(postIncrement);
  ok('POST /increment expanded, "Try it out" clicked');

  const textarea = postIncrement.locator('textarea.body-param__text');
  await textarea.waitFor();
  const requestBody = `{"key": "${key}", "value": ${VALUE}}`;
  await textarea.fill(requestBody);
  assert.equal(await textarea.inputValue(), requestBody, 'the request body textarea holds the new body');
  ok(`request body replaced with ${requestBody}`);

  const posted = await execute(postIncrement, 'POST', /^\/increment$/);
  assert.equal(posted.networkStatus, 202, 'POST /increment network status');
  assert.equal(posted.status, '202', 'status shown in the live response');
  ok('"Execute" → the live response shows 202 (and the network saw 202)');

  // The database: the flusher writes the increment within a flush interval.
  const { polls, ms } = await waitForStoredValue(key, VALUE);
  ok(`database ${DB_NAME}: select value from counters where key = '${key}' → ${VALUE} (after ${ms} ms, ${polls} polls)`);

  // GET /counters/{key} through "Try it out".
  const getCounter = operation('get', '/counters/{key}');
  await openTryItOut(getCounter);
  ok('GET /counters/{key} expanded, "Try it out" clicked');

  const keyInput = getCounter.locator('tr[data-param-name="key"] input');
  await keyInput.waitFor();
  await keyInput.fill(key);
  assert.equal(await keyInput.inputValue(), key);
  ok(`path parameter key = ${key}`);

  const got = await execute(getCounter, 'GET', /^\/counters\/[^/]+$/);
  assert.equal(got.networkStatus, 200, 'GET /counters/{key} network status');
  assert.equal(got.status, '200', 'status shown in the live response');
  assert.match(got.body, new RegExp(`"value":\\s*${VALUE}\\b`), `the response body shows "value": ${VALUE}; body: ${got.body}`);
  assert.ok(got.body.includes(JSON.stringify(key)), `the response body names the key; body: ${got.body}`);
  ok(`"Execute" → the live response shows 200 with ${got.body.replace(/\s+/g, ' ')}`);

  // Nothing outside loopback was needed.
  const neededTypes = new Set(['document', 'script', 'stylesheet', 'font']);
  const neededBlocked = blocked.filter((b) => neededTypes.has(b.resourceType));
  assert.deepEqual(neededBlocked, [], 'no page asset (document/script/stylesheet/font) from outside loopback');
  if (blocked.length > 0) {
    console.log(`  note: ${blocked.length} optional non-loopback request(s) blocked:`);
    for (const b of blocked) console.log(`    ${b.resourceType} ${b.url}`);
  }
  ok(
    `requests to hosts other than 127.0.0.1/localhost: ${blocked.length} (all blocked by page.route, ` +
      'none of them a page asset); the UI rendered and worked without them',
  );

  assert.deepEqual(pageErrors, [], 'no uncaught errors in the page');
  ok(`no uncaught page errors (${consoleErrors.length} console error message(s))`);
  for (const e of consoleErrors) console.log(`    console error: ${e}`);

  // The blocking itself works: a request to another host from the page is aborted and counted.
  const before = blocked.length;
  const probe = await page.evaluate(() =>
    fetch('http://offline-probe.example/', { mode: 'no-cors' }).then(
      () => 'answered',
      () => 'failed',
    ),
  );
  assert.equal(probe, 'failed', 'a fetch to http://offline-probe.example/ fails');
  assert.equal(blocked.length, before + 1, 'the probe went through the blocking route');
  ok('self-check: a fetch to http://offline-probe.example/ from the page was blocked and counted');

  if (process.env.KEY_FILE) fs.writeFileSync(process.env.KEY_FILE, key);
}

// Last resort if something hangs despite the per-step timeouts: fail, screenshot, close.
let watchdog;
const deadline = new Promise((_, reject) => {
  watchdog = setTimeout(
    () => reject(new Error(`the test did not finish within ${TEST_TIMEOUT_MS} ms`)),
    TEST_TIMEOUT_MS,
  );
});

let failed = false;
try {
  await Promise.race([run(), deadline]);
} catch (err) {
  failed = true;
  gaveUp = true;
  console.error(`not ok ${checks.length + 1} - ${err.message}`);
  if (blocked.length) console.error(`  blocked non-loopback requests: ${blocked.map((b) => b.url).join(', ')}`);
  if (pageErrors.length) console.error(`  page errors: ${pageErrors.join(' | ')}`);
  await saveFailureArtifacts();
} finally {
  clearTimeout(watchdog);
  await closeBrowser();
}

if (failed) {
  process.exit(1); // also abandons a run() still pending after the watchdog fired
}
console.log(`Swagger UI browser test passed: ${checks.length} checks`);
