#!/usr/bin/env node
// A small client for the increment service, and a command-line demo.
// Node 20 or later: the global `fetch`, no dependencies.
//
// As a library:
//
//   import { IncrementClient, IncrementError } from "./increment-client.mjs";
//   const client = new IncrementClient("http://127.0.0.1:4000");
//   await client.increment("page:/home", 1);                          // 202: taken
//   await client.increment("page:/home", 1, { wait: true });          // 200: committed
//   await client.incrementMany([["a", 1], ["b", -2]]);                // 202: all taken
//   try { await client.increment("x".repeat(300), 1); }
//   catch (e) { if (e instanceof IncrementError) console.log(e.problemType, e.detail); }
//
// As a demo (what scripts/examples-test.sh runs):
//
//   node increment-client.mjs --url http://127.0.0.1:4000 --prefix demo \
//     --keys 3 --count 30 [--batch-size 10 | --wait]
//
// Increment i (0-based) goes to key `<prefix>:<i % keys>` with value i + 1, so
// the expected totals can be computed without asking the demo. It logs every
// retry to stderr and prints one JSON summary on stdout.
//
// Why it retries the way it does (README, "Retrying safely"):
// - Every logical request gets one `Idempotency-Key` (a random UUID), and every
//   retry of it sends the same key and the same body. The service applies a key
//   at most once within its window, on any instance, so resending something
//   that may already have been applied cannot count it twice. That is what
//   makes retrying an unknown outcome safe; without the key, a retry after a
//   lost answer may double the increment.
// - No answer (a reset, a timeout, a refused connection) and 502/504 mean
//   "unknown": retry with the same key. 503 means nothing was taken: retry
//   after `Retry-After` seconds. 408 (body too slow) and 429 are retried as is.
// - Any other 4xx is final: resending the same request gets the same refusal.
//   Its RFC 9457 problem document (`type`, `detail`) is thrown.
// - Retries are bounded by a number of attempts and an overall deadline, and
//   spaced by exponential backoff with jitter, so many clients that failed
//   together (an instance restarting) do not come back in lockstep.

import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { parseArgs } from "node:util";
import { pathToFileURL } from "node:url";

// Statuses after which the same request may succeed. 502/504 come from a proxy
// while an instance restarts (the request may or may not have been applied:
// the key makes the retry safe); 503 means nothing was taken.
const RETRYABLE_STATUSES = new Set([408, 429, 502, 503, 504]);
// Of those, the ones where the service may have applied the request.
const AMBIGUOUS_STATUSES = new Set([502, 504]);

/**
 * The request did not get a successful answer.
 *
 * `maybeApplied` is true when the last attempt got no answer or a 502/504: the
 * increment may have been applied (at most once, thanks to the key). To settle
 * it, resend later with the same `idempotencyKey`.
 */
export class IncrementError extends Error {
  constructor(message, { status, problemType, title, detail, attempts, idempotencyKey, maybeApplied, cause }) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "IncrementError";
    this.status = status;
    this.problemType = problemType;
    this.title = title;
    this.detail = detail;
    this.attempts = attempts;
    this.idempotencyKey = idempotencyKey;
    this.maybeApplied = maybeApplied;
  }
}

/**
 * Sends increments; retries what is safe to retry, with one key per request.
 *
 * `timeoutMs` bounds each attempt, `deadlineMs` the whole logical request
 * including its waits, `maxAttempts` the number of sends. Backoff starts at
 * `baseDelayMs` and doubles up to `maxDelayMs`. `onRetry({ attempt, reason,
 * delayMs, fromRetryAfter })` is called before each wait.
 */
export class IncrementClient {
  constructor(baseUrl, {
    timeoutMs = 5000,
    maxAttempts = 8,
    deadlineMs = 30000,
    baseDelayMs = 100,
    maxDelayMs = 5000,
    onRetry = undefined,
  } = {}) {
    if (maxAttempts < 1) throw new RangeError("maxAttempts must be at least 1");
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    Object.assign(this, { timeoutMs, maxAttempts, deadlineMs, baseDelayMs, maxDelayMs, onRetry });
  }

  /** Adds `value` to counter `key` (POST /increment). Resolves to the answer; throws IncrementError. */
  increment(key, value, { wait = false, idempotencyKey } = {}) {
    return this.#send("/increment", { key, value }, 1, wait, idempotencyKey);
  }

  /**
   * Adds several [key, value] pairs as a whole (POST /increments): all are
   * applied or none. 1 to 1,000 items. (This route has no wait=true: a 202
   * means taken, written by the next flush.) Throws IncrementError.
   */
  incrementMany(items, { idempotencyKey } = {}) {
    const increments = Array.from(items, ([key, value]) => ({ key, value }));
    return this.#send("/increments", { increments }, increments.length, false, idempotencyKey);
  }

  async #send(path, payload, count, wait, idempotencyKey) {
    // One key and one body for the logical request, fixed before the first
    // attempt: a retry must be the very same request, or the service refuses
    // it as a reused key (422) instead of answering it as a repeat.
    const key = idempotencyKey ?? randomUUID();
    const body = JSON.stringify(payload);
    const url = `${this.baseUrl}${path}${wait ? "?wait=true" : ""}`;
    const headers = {
      "Content-Type": "application/json",
      // A structured-field string (RFC 8941), as the IETF draft writes it; the
      // service also takes the bare value.
      "Idempotency-Key": `"${key}"`,
    };
    const giveUpAt = Date.now() + this.deadlineMs;
    for (let attempt = 1; ; attempt++) {
      const remaining = giveUpAt - Date.now();
      const answer = await this.#attempt(url, body, headers, Math.max(1, Math.min(this.timeoutMs, remaining)));

      if (answer.status >= 200 && answer.status < 300) {
        return {
          status: answer.status,
          // A 202 to wait=true means taken and held, not committed within the
          // service's --wait-timeout.
          committed: wait && answer.status === 200,
          accepted: count,
          attempts: attempt,
          idempotencyKey: key,
        };
      }

      const retryable = answer.failure !== undefined || RETRYABLE_STATUSES.has(answer.status);
      const retryAfterMs = retryAfterMillis(answer.headers);
      const fromRetryAfter = retryAfterMs !== undefined;
      // With Retry-After: a little jitter on top, never below what was asked.
      const delayMs = fromRetryAfter ? retryAfterMs * (1 + Math.random() * 0.1) : this.#backoff(attempt);
      const outOfTime = Date.now() + delayMs >= giveUpAt;
      if (!retryable || attempt >= this.maxAttempts || outOfTime) {
        throw makeError(answer, attempt, key, retryable, outOfTime);
      }
      const reason = answer.failure ?? `HTTP ${answer.status}`;
      this.onRetry?.({ attempt, reason, delayMs, fromRetryAfter });
      await sleep(delayMs);
    }
  }

  // One send. Never throws: returns { status, headers, body } for an answer,
  // or { failure, cause, maybeSent } when none came whole (maybeSent false
  // only when the connection was refused: the request never left).
  async #attempt(url, body, headers, timeoutMs) {
    try {
      const response = await fetch(url, {
        method: "POST",
        headers,
        body,
        // A POST must not silently change target.
        redirect: "manual",
        signal: AbortSignal.timeout(timeoutMs),
      });
      // Read the body inside the try: the connection can break after the
      // status line, and then the outcome is still unknown.
      const text = await response.text();
      return { status: response.status, headers: response.headers, body: text };
    } catch (error) {
      // fetch rejects with a TypeError ("fetch failed", the socket error in
      // `cause`) when the connection is refused, reset or closed before the
      // answer, and with a TimeoutError when the signal fires. The service may
      // have applied the request.
      const why = error?.name === "TimeoutError"
        ? `timed out after ${timeoutMs} ms`
        : `${error?.message ?? error}${error?.cause ? `: ${error.cause.code ?? error.cause.message}` : ""}`;
      return { failure: `no answer: ${why}`, cause: error, maybeSent: error?.cause?.code !== "ECONNREFUSED" };
    }
  }

  #backoff(attempt) {
    // Exponential, capped, with "equal jitter": half the step is fixed so
    // retries never come back at once, half random to spread clients.
    const step = Math.min(this.maxDelayMs, this.baseDelayMs * 2 ** (attempt - 1));
    return step / 2 + Math.random() * (step / 2);
  }
}

// Retry-After as milliseconds: delta-seconds or an HTTP-date (RFC 9110);
// undefined when absent or unreadable (then backoff applies).
function retryAfterMillis(headers) {
  const value = headers?.get("retry-after")?.trim();
  if (!value) return undefined;
  if (/^\d+$/.test(value)) return Number(value) * 1000;
  const when = Date.parse(value);
  return Number.isNaN(when) ? undefined : Math.max(0, when - Date.now());
}

// The RFC 9457 problem document of an error answer, or {}.
function problemOf(answer) {
  if (!answer.body || !(answer.headers?.get("content-type") ?? "").includes("json")) return {};
  try {
    const document = JSON.parse(answer.body);
    return document !== null && typeof document === "object" && !Array.isArray(document) ? document : {};
  } catch {
    return {};
  }
}

function makeError(answer, attempts, key, retryable, outOfTime) {
  const problem = problemOf(answer);
  const maybeApplied = (answer.failure !== undefined && answer.maybeSent) || AMBIGUOUS_STATUSES.has(answer.status);
  let what = answer.failure
    ?? `HTTP ${answer.status}${problem.type ? ` ${problem.type}` : ""}${problem.detail ? `: ${problem.detail}` : ""}`;
  if (retryable) what = `${outOfTime ? "deadline reached" : `gave up after ${attempts} attempts`}; last: ${what}`;
  if (maybeApplied) what += ` (may have been applied once; resend with Idempotency-Key ${key} to settle)`;
  return new IncrementError(what, {
    status: answer.status,
    problemType: problem.type,
    title: problem.title,
    detail: problem.detail,
    attempts,
    idempotencyKey: key,
    maybeApplied,
    cause: answer.cause,
  });
}

// ---------------------------------------------------------------------------
// The command-line demo.

const USAGE = `usage: increment-client.mjs [--url URL] [--prefix P] [--keys K] [--count N]
                           [--batch-size B] [--wait] [--timeout S] [--max-attempts N] [--deadline S]

Send increments to an increment service, retrying safely.
  --url URL         service base URL (default http://127.0.0.1:4000)
  --prefix P        key prefix; keys are P:0..K-1 (default demo)
  --keys K          distinct keys (default 3)
  --count N         increments to send (default 10)
  --batch-size B    send them with POST /increments, B per request (default: one POST /increment each)
  --wait            wait=true: each POST /increment answered 200 once committed (not with --batch-size)
  --timeout S       seconds per attempt (default 5)
  --max-attempts N  sends per logical request (default 8)
  --deadline S      seconds per logical request, waits included (default 30)`;

function parseCommandLine(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      url: { type: "string", default: "http://127.0.0.1:4000" },
      prefix: { type: "string", default: "demo" },
      keys: { type: "string", default: "3" },
      count: { type: "string", default: "10" },
      "batch-size": { type: "string", default: "0" },
      wait: { type: "boolean", default: false },
      timeout: { type: "string", default: "5" },
      "max-attempts": { type: "string", default: "8" },
      deadline: { type: "string", default: "30" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  const whole = (name) => {
    const n = Number(values[name]);
    if (!Number.isInteger(n)) throw new Error(`--${name} must be a whole number`);
    return n;
  };
  const seconds = (name) => {
    const n = Number(values[name]);
    if (!(n > 0)) throw new Error(`--${name} must be a positive number of seconds`);
    return n;
  };
  const options = {
    help: values.help,
    url: values.url,
    prefix: values.prefix,
    keys: whole("keys"),
    count: whole("count"),
    batchSize: whole("batch-size"),
    wait: values.wait,
    timeoutMs: seconds("timeout") * 1000,
    maxAttempts: whole("max-attempts"),
    deadlineMs: seconds("deadline") * 1000,
  };
  if (options.keys < 1 || options.count < 1 || options.batchSize < 0 || options.batchSize > 1000) {
    throw new Error("--keys and --count must be at least 1, --batch-size 0 to 1000");
  }
  if (options.wait && options.batchSize > 0) {
    throw new Error("--wait applies to POST /increment only; POST /increments has no wait=true");
  }
  return options;
}

async function main(argv) {
  let options;
  try {
    options = parseCommandLine(argv);
  } catch (error) {
    console.error(`${USAGE}\n\nerror: ${error.message}`);
    return 2;
  }
  if (options.help) {
    console.log(USAGE);
    return 0;
  }

  const waits = [];
  const client = new IncrementClient(options.url, {
    timeoutMs: options.timeoutMs,
    maxAttempts: options.maxAttempts,
    deadlineMs: options.deadlineMs,
    onRetry: ({ attempt, reason, delayMs, fromRetryAfter }) => {
      const source = fromRetryAfter ? "Retry-After" : "backoff";
      console.error(`retry: attempt ${attempt} failed (${reason}); waiting ${(delayMs / 1000).toFixed(2)} s (${source})`);
      waits.push({ seconds: Math.round(delayMs) / 1000, retry_after: fromRetryAfter, reason });
    },
  });
  const planned = Array.from({ length: options.count }, (_, i) => [`${options.prefix}:${i % options.keys}`, i + 1]);
  const summary = { requests: 0, increments: 0, attempts: 0, committed: 0 };
  const started = performance.now();
  const count = (answer) => {
    summary.attempts += answer.attempts;
    summary.requests += 1;
    summary.increments += answer.accepted;
    summary.committed += answer.committed ? 1 : 0;
  };
  const report = (error) => {
    summary.elapsed_s = Math.round(performance.now() - started) / 1000;
    summary.waits = waits;
    if (error) {
      summary.error = {
        status: error.status ?? null,
        type: error.problemType ?? null,
        detail: error.detail ?? null,
        attempts: error.attempts,
        maybe_applied: error.maybeApplied,
      };
    }
    console.log(JSON.stringify(summary));
  };

  try {
    if (options.batchSize > 0) {
      for (let i = 0; i < planned.length; i += options.batchSize) {
        count(await client.incrementMany(planned.slice(i, i + options.batchSize)));
      }
    } else {
      for (const [key, value] of planned) {
        count(await client.increment(key, value, { wait: options.wait }));
      }
    }
  } catch (error) {
    if (!(error instanceof IncrementError)) throw error;
    summary.attempts += error.attempts;
    console.error(`error: ${error.message}`);
    if (error.problemType) {
      console.error(`problem type: ${error.problemType}`);
      console.error(`problem detail: ${error.detail}`);
    }
    report(error);
    return 1;
  }
  report();
  return 0;
}

// Run the demo only when executed, not when imported as a library.
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  process.exitCode = await main(process.argv.slice(2));
}
