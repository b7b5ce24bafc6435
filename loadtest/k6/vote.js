// k6 load test of Landslide's voting path, with a check of the final tally.
//
// Each VU is one voter for the whole run and keeps its cookie across iterations
// (noCookiesReset). Its final choice is fixed by its VU number, so teardown() can compute the
// expected counts without shared memory: voter v ends on "dogs" when v % 3 == 0, else on "cats".
// A share of the voters (CHANGE_SHARE, default 0.3, also fixed by the VU number) first vote for
// the other option and change their minds in the same iteration.
//
// Every iteration opens the form (GET /) and votes (POST /api/votes); from the second iteration
// on, the form must show the voter's vote, which only the kept cookie can tell any node. Later
// iterations vote the same choice again, so they add load but no ballots. Every request goes to
// an ingest node picked at random from INGEST_URLS. A vote is retried with the same
// Idempotency-Key after a 503 (or no answer) until it gets a 202.
//
// teardown() waits until tally's /api/results/pets shows nothing pending as of a moment after the
// run, and checks counts == setup's baseline + the VUs' final choices. That assumes every VU
// completed its first iteration, which the `checks` threshold (every vote accepted) stands for.
// What only landslide-goose checks: voters who change their minds once and never come back, one
// ballot per iteration, recorded from each 202 as it arrives.
//
// Environment: INGEST_URLS (comma-separated), TALLY_URL, VOTERS (VUs, default 200), DURATION
// (default 20s), CHANGE_SHARE (default 0.3), SETTLE_SECS (default 120).

import http from 'k6/http';
import exec from 'k6/execution';
import { check, sleep } from 'k6';
import { Counter } from 'k6/metrics';

const INGEST = (__ENV.INGEST_URLS || 'http://127.0.0.1:8080,http://127.0.0.1:8082')
  .split(',')
  .map((url) => url.trim().replace(/\/+$/, ''))
  .filter((url) => url !== '');
const TALLY = (__ENV.TALLY_URL || 'http://127.0.0.1:8081').replace(/\/+$/, '');
const VOTERS = parseInt(__ENV.VOTERS || '200', 10);
const DURATION = __ENV.DURATION || '20s';
const CHANGE_SHARE = parseFloat(__ENV.CHANGE_SHARE || '0.3');
const SETTLE_SECS = parseFloat(__ENV.SETTLE_SECS || '120');
const RESULTS = `${TALLY}/api/results/pets`;
// How long one vote is retried while its outcome is open.
const VOTE_DEADLINE_MS = 60000;
const LABELS = { cats: 'Cats', dogs: 'Dogs' };
// Votes answered 202, so the summary shows accepted votes per second.
const votesAccepted = new Counter('votes_accepted');

export const options = {
  // Voters keep their cookie from one iteration to the next.
  noCookiesReset: true,
  scenarios: {
    voters: {
      executor: 'constant-vus',
      vus: VOTERS,
      duration: DURATION,
      gracefulStop: '60s',
    },
  },
  thresholds: {
    // The `scenario` tag leaves out setup's and teardown's requests to tally.
    'http_req_failed{scenario:voters}': ['rate<0.01'],
    'http_req_duration{scenario:voters}': ['p(99)<500'],
    // Listed so that the summary shows each request's own latency.
    'http_req_duration{name:GET /}': ['p(99)<500'],
    'http_req_duration{name:POST /api/votes}': ['p(99)<500'],
    // Every vote accepted, every form showing the vote, and the tally exact.
    checks: ['rate==1'],
  },
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(99)', 'max'],
  // setup() and teardown() wait for tally to settle.
  setupTimeout: `${SETTLE_SECS + 30}s`,
  teardownTimeout: `${SETTLE_SECS + 30}s`,
};

/// The choice voter `vu` ends on.
function finalChoice(vu) {
  return vu % 3 === 0 ? 'dogs' : 'cats';
}

/// Whether voter `vu` first votes the other way. 37 is prime to 100, so `vu * 37 % 100` runs
/// through every residue once per 100 VUs: exactly CHANGE_SHARE of each hundred change.
function changesMind(vu) {
  return ((vu * 37) % 100) < CHANGE_SHARE * 100;
}

function other(choice) {
  return choice === 'cats' ? 'dogs' : 'cats';
}

function node() {
  return INGEST[Math.floor(Math.random() * INGEST.length)];
}

function openForm(shows) {
  const res = http.get(`${node()}/`, { tags: { name: 'GET /' } });
  const checks = { 'form loads': (r) => r.status === 200 };
  if (shows) {
    checks['form shows the vote'] = (r) =>
      typeof r.body === 'string' && r.body.includes(`Your vote: <strong>${LABELS[shows]}</strong>`);
  }
  check(res, checks);
}

/// `n` random hex digits (unique enough for an idempotency key; not a secret).
function randomHex(n) {
  let out = '';
  while (out.length < n) out += Math.floor(Math.random() * 0x100000000).toString(16).padStart(8, '0');
  return out.slice(0, n);
}

/// Votes until a 202 or a refusal; true when accepted.
function vote(choice, key) {
  const body = JSON.stringify({ poll: 'pets', choice });
  const deadline = Date.now() + VOTE_DEADLINE_MS;
  let pause = 0.1;
  for (let attempt = 0; ; attempt++) {
    const res = http.post(`${node()}/api/votes`, body, {
      headers: { 'Content-Type': 'application/json', 'Idempotency-Key': key },
      tags: { name: attempt === 0 ? 'POST /api/votes' : 'POST /api/votes (retry)' },
    });
    if (res.status === 202) {
      votesAccepted.add(1);
      return check(res, { 'vote accepted': (r) => r.json('event_id') !== undefined });
    }
    if (res.status >= 400 && res.status < 500) {
      // Refused: not taken, and a retry would be refused the same way.
      return check(res, { 'vote accepted': () => false });
    }
    // 503, another 5xx, or no answer (status 0): perhaps stored, so retry with the same key.
    if (res.status === 503) {
      pause = Math.min(parseFloat(res.headers['Retry-After'] || '1'), 5);
    } else {
      pause = Math.min(pause * 2, 5);
    }
    if (Date.now() + pause * 1000 > deadline) {
      return check(res, { 'vote accepted': () => false });
    }
    sleep(pause);
  }
}

/// tally's results once nothing is pending as of `after` (ms since the epoch) or later.
function settled(after) {
  const deadline = Date.now() + SETTLE_SECS * 1000;
  let last = 'no answer';
  while (Date.now() < deadline) {
    const res = http.get(RESULTS, { tags: { name: 'GET /api/results/pets' } });
    if (res.status === 200) {
      const results = res.json();
      if (results.pending === 0 && Date.parse(results.as_of) >= after) {
        return results;
      }
      last = `pending ${results.pending} as of ${results.as_of}`;
    } else {
      last = `status ${res.status}`;
    }
    sleep(0.25);
  }
  exec.test.abort(`${RESULTS} still unsettled after ${SETTLE_SECS}s: ${last}`);
  return null;
}

function counts(results) {
  return { cats: results.counts.cats || 0, dogs: results.counts.dogs || 0, total: results.total };
}

export function setup() {
  // Votes already in the tally (an earlier run on the same stack) are the baseline.
  const baseline = counts(settled(Date.now()));
  console.log(`baseline: ${JSON.stringify(baseline)}`);
  return { baseline };
}

export default function () {
  const vu = exec.vu.idInTest;
  const iteration = exec.vu.iterationInScenario;
  const choice = finalChoice(vu);
  // Random: a key sent without the cookie must be (16 characters at least), and a run must not
  // reuse an earlier run's keys, which would make its votes retries of theirs.
  const key = (step) => `k6-${vu}-${iteration}-${step}-${randomHex(16)}`;
  if (iteration === 0) {
    openForm(null);
    if (changesMind(vu)) {
      if (!vote(other(choice), key('first'))) return;
      openForm(other(choice));
    }
    vote(choice, key('final'));
  } else {
    openForm(choice);
    vote(choice, key('again'));
  }
}

export function teardown(data) {
  const ended = Date.now();
  const actual = counts(settled(ended));
  const expected = { ...data.baseline };
  for (let vu = 1; vu <= VOTERS; vu++) {
    expected[finalChoice(vu)] += 1;
    expected.total += 1;
  }
  const exact =
    actual.cats === expected.cats && actual.dogs === expected.dogs && actual.total === expected.total;
  check(actual, { 'tally matches the voters\' final choices': () => exact });
  const line = (c) => `cats=${c.cats}, dogs=${c.dogs}, total=${c.total}`;
  console.log(`tally check: ${exact ? 'PASSED' : 'FAILED'}`);
  console.log(`  expected (baseline + each VU's final choice): ${line(expected)}`);
  console.log(`  tally ${RESULTS} (pending 0): ${line(actual)}`);
  if (!exact) {
    exec.test.fail('the tally does not match the voters\' final choices');
  }
}
