/**
 * Trusted-session benchmark: what switching the end user costs, against the two alternatives.
 *
 *   npm run bench:trust                               # defaults: 32 clients, 10 s per scenario
 *   npm run bench:trust -- --duration 5 --clients 16 --scenarios a,b,c
 *
 * One embedded PostgreSQL, the trustgate catalog installed, 1,000 permanent proxy users
 * (pu_1 … pu_1000, LOGIN with a SCRAM password so they can also log on themselves) granted
 * CONNECT THROUGH app_tier … WITHOUT ROLE through the gateway by a trustgate administrator, and
 * trustgate in its own process (transaction pool mode). pgbench drives every scenario (simple
 * protocol, -j 2, the same client count and duration):
 *
 *   (a)   BEGIN; SELECT one row of a plain table; COMMIT           through trustgate as app_tier
 *   (b)   BEGIN; SET QUERY_BAND = 'ProxyUser=pu_<random>;' FOR TRANSACTION; SELECT …; COMMIT
 *                                                                  through trustgate as app_tier
 *   (b2)  as (b), the SELECT on a table with a row-level-security policy by trustgate.proxy_user()
 *   (a1)  the request in one round trip without a proxy: SELECT (autocommit)     through trustgate
 *   (b1)  the request in one round trip with a proxy: SET QUERY_BAND … FOR TRANSACTION; SELECT as
 *         one simple query (a band leading a multi-statement request; pgbench's \; joins them)
 *   (c)   pgbench -C: a new SCRAM logon per request as an end user, directly to PostgreSQL, SELECT
 *   (c-tg) as (c), the logon through trustgate (its server connection comes from the pool)
 *   (d)   (a) directly against PostgreSQL (reference: the gateway's own overhead)
 *   (e)   directly against PostgreSQL, the switch by hand: BEGIN; SET LOCAL ROLE pu_<random>; SELECT;
 *         COMMIT (reference: what an extra statement and a role switch cost PostgreSQL itself)
 *   (d1)  (a1) directly against PostgreSQL
 *   (e1)  directly against PostgreSQL: the statement trustgate puts in front of a band-led request
 *         (set_config of role, identity token and MAC, is_local) and the SELECT in one query
 *         (reference: PostgreSQL's own cost of the switch, the floor for (b1)/(a1))
 *
 * Targets (the issue): (b) ≥ 0.8 × (a) and (b) ≥ 20 × (c). Writes bench/results/trust-latest.{json,md}.
 * Needs pgbench (PostgreSQL client tools). Every wait is bounded; all processes and temp dirs are
 * cleaned up at the end, on error and on SIGINT/SIGTERM.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import type { EmbeddedPostgres } from '../src/embedded/postgres.js';
import {
  ROOT, log, setLogTag, fmtInt, commandLineFlags, runBenchmark, wasInterrupted, armWatchdog, requireTools, makeTempDir, describeMachine,
  POSTGRES_SETTINGS, AUTH_DATABASE, startPostgres, installAuthQuery,
  prepareLauncher, launchKind, startGatewayChild, gatewayConfig, exited, type GatewayChild, type SharedOptions,
  runPgbench, pgbenchTarget, pgbenchFailure, type PgbenchSummary,
  gitState,
} from './common.js';

setLogTag('bench:trust');

// ------------------------------------------------------------------ options

const SCENARIOS = ['a', 'b', 'b2', 'a1', 'b1', 'c', 'c-tg', 'd', 'e', 'd1', 'e1'] as const;
type ScenarioId = (typeof SCENARIOS)[number];

interface Options extends SharedOptions {
  duration: number;
  clients: number;
  users: number;
  poolSize: number;
  warmup: number;
  rounds: number;
  scenarios: ScenarioId[];
  logLevel: string;
}

const USAGE = `usage: npm run bench:trust -- [options]
  --duration <s>        seconds per scenario (default 10)
  --clients <n>         concurrent pgbench clients in every scenario (default 32)
  --users <n>           permanent proxy users pu_1 … pu_<n> (default 1000)
  --pool-size <n>       trustgate server connections per pool (default 20, as npm run bench)
  --warmup <s>          unrecorded warm-up per target (default 3, 0 = none)
  --rounds <n>          run all scenarios n times, interleaved; report each one's median (default 1)
  --scenarios <list>    ${SCENARIOS.join(',')} (default all)
  --log-level <level>   trustgate log level (default warn; debug to investigate, printed on failure)
  --no-build            do not run tsc -p tsconfig.build.json first (uses dist/ if present)
  --out <dir>           results directory (default bench/results)`;

/** The options that take one whole number, and the least each accepts. */
type WholeNumberKey = 'duration' | 'clients' | 'users' | 'poolSize' | 'warmup' | 'rounds';
const WHOLE_NUMBER_OPTIONS = new Map<string, { key: WholeNumberKey; min: number }>([
  ['--duration', { key: 'duration', min: 1 }],
  ['--clients', { key: 'clients', min: 1 }],
  ['--users', { key: 'users', min: 1 }],
  ['--pool-size', { key: 'poolSize', min: 1 }],
  ['--warmup', { key: 'warmup', min: 0 }],
  ['--rounds', { key: 'rounds', min: 1 }],
]);

function wholeNumber(v: string, flag: string, min: number): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) throw new Error(`${flag}: "${v}" is not an integer ≥ ${min}`);
  return n;
}

function parseOptions(argv: string[]): Options {
  const o: Options = {
    duration: 10,
    clients: 32,
    users: 1000,
    poolSize: 20,
    warmup: 3,
    rounds: 1,
    scenarios: [...SCENARIOS],
    logLevel: 'warn',
    build: true,
    out: path.join(ROOT, 'bench', 'results'),
  };
  for (const { flag, value, unknown } of commandLineFlags(argv, USAGE, o)) {
    const whole = WHOLE_NUMBER_OPTIONS.get(flag);
    if (whole) {
      o[whole.key] = wholeNumber(value(), flag, whole.min);
      continue;
    }
    switch (flag) {
      case '--scenarios':
        o.scenarios = value()
          .split(',')
          .map((s) => {
            const x = s.trim() as ScenarioId;
            if (!SCENARIOS.includes(x)) throw new Error(`--scenarios: "${s}" is not one of ${SCENARIOS.join(', ')}`);
            return x;
          });
        break;
      case '--log-level':
        o.logLevel = value();
        if (!['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'].includes(o.logLevel)) throw new Error(`--log-level: unknown level ${o.logLevel}`);
        break;
      default:
        throw unknown();
    }
  }
  if (o.duration > 600) throw new Error('--duration: at most 600 s per scenario');
  if (o.users > 100_000) throw new Error('--users: at most 100000');
  if (o.clients > 300) throw new Error('--clients: at most 300 (max_connections 400 is shared with the pools)');
  return o;
}

// ------------------------------------------------------------------ environment


// ------------------------------------------------------------------ the database

const DB = AUTH_DATABASE; // the catalog lives in the database the auth query uses
const ADMIN = 'bench_secadm';
const ADMIN_PASSWORD = 'bench-secadm-password';
const TRUSTED = 'app_tier';
const TRUSTED_PASSWORD = 'app-tier-bench-password';
const PROXY_PASSWORD = 'proxy-user-bench-password';
const READER = 'trust_bench_reader';
const ORDERS_PER_USER = 5;
const ITEMS = 1000;
const GRANT_BATCH = 25; // the most names GRANT CONNECT THROUGH accepts in one statement
// pu_1 … pu_N, not zero-padded: pgbench builds the name in the band literal from a number (pu_:p).
const proxyName = (i: number) => `pu_${i}`;

async function setupDatabase(db: EmbeddedPostgres, users: number): Promise<void> {
  await db.query(`
    CREATE ROLE ${TRUSTED} LOGIN PASSWORD '${TRUSTED_PASSWORD}';
    CREATE ROLE ${ADMIN} LOGIN PASSWORD '${ADMIN_PASSWORD}';
    GRANT trustgate_admin TO ${ADMIN};
    CREATE ROLE ${READER} NOLOGIN;
    CREATE SCHEMA trust_bench;
    GRANT USAGE ON SCHEMA trust_bench TO PUBLIC;
    CREATE TABLE trust_bench.items (id int PRIMARY KEY, name text NOT NULL);
    INSERT INTO trust_bench.items SELECT i, 'item ' || i FROM generate_series(1, ${ITEMS}) AS i;
    CREATE TABLE trust_bench.orders (id int PRIMARY KEY, owner text NOT NULL, item text NOT NULL);
    INSERT INTO trust_bench.orders
      SELECT i, 'pu_' || ((i - 1) / ${ORDERS_PER_USER} + 1), 'item ' || (i % ${ITEMS} + 1)
      FROM generate_series(1, ${users * ORDERS_PER_USER}) AS i;
    CREATE INDEX ON trust_bench.orders (owner);
    ALTER TABLE trust_bench.orders ENABLE ROW LEVEL SECURITY;
    CREATE POLICY by_proxy_user ON trust_bench.orders USING (owner = (SELECT trustgate.proxy_user()));
    GRANT SELECT ON trust_bench.items, trust_bench.orders TO ${READER};
    GRANT ${READER} TO ${TRUSTED};
    ANALYZE trust_bench.items, trust_bench.orders;
  `);
  // Proxy users: LOGIN with a SCRAM password (the server computes the verifier) for scenario (c).
  for (let from = 1; from <= users; from += 100) {
    const names = Array.from({ length: Math.min(100, users - from + 1) }, (_, k) => proxyName(from + k));
    await db.query(
      names.map((n) => `CREATE ROLE ${n} LOGIN PASSWORD '${PROXY_PASSWORD}' IN ROLE ${READER};`).join('\n') +
        `\nGRANT ${names.join(', ')} TO ${ADMIN} WITH ADMIN OPTION;`,
    );
  }
}

function clientConfig(port: number, user: string, password: string): pg.ClientConfig {
  return { host: '127.0.0.1', port, user, password, database: DB, connectionTimeoutMillis: 30_000 };
}

async function withClient<T>(config: pg.ClientConfig, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client(config);
  c.on('error', () => undefined);
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end().catch(() => undefined);
  }
}

/** GRANT CONNECT THROUGH for every proxy user, through the gateway, as the trustgate administrator. */
async function grantConnectThrough(gatewayPort: number, users: number): Promise<number> {
  return withClient(clientConfig(gatewayPort, ADMIN, ADMIN_PASSWORD), async (c) => {
    for (let from = 1; from <= users; from += GRANT_BATCH) {
      const names = Array.from({ length: Math.min(GRANT_BATCH, users - from + 1) }, (_, k) => proxyName(from + k));
      const r = await c.query(`GRANT CONNECT THROUGH ${TRUSTED} TO PERMANENT ${names.join(', ')} WITHOUT ROLE`);
      if (r.command !== 'GRANT') throw new Error(`GRANT CONNECT THROUGH answered ${r.command}`);
    }
    const [{ n }] = (await c.query(`SELECT count(*)::int AS n FROM trustgate.connect_rules WHERE status = 'granted' AND trusted_user = $1`, [TRUSTED])).rows;
    return n as number;
  });
}

/** One proxied request by hand, checked: the identity switch and the RLS policy work. */
async function sanityCheck(gatewayPort: number, users: number): Promise<void> {
  const user = proxyName(Math.max(1, Math.floor(users / 2)));
  await withClient(clientConfig(gatewayPort, TRUSTED, TRUSTED_PASSWORD), async (c) => {
    await c.query('BEGIN');
    await c.query(`SET QUERY_BAND = 'ProxyUser=${user};' FOR TRANSACTION`);
    const who = (await c.query('SELECT current_user AS cu, session_user AS su, trustgate.proxy_user() AS pu')).rows[0];
    const orders = (await c.query('SELECT owner FROM trust_bench.orders')).rows as { owner: string }[];
    await c.query('COMMIT');
    const after = (await c.query('SELECT current_user AS cu, trustgate.proxy_user() AS pu, (SELECT count(*)::int FROM trust_bench.orders) AS n')).rows[0];
    const problems: string[] = [];
    if (who.cu !== user || who.su !== TRUSTED || who.pu !== user) problems.push(`in the request: ${JSON.stringify(who)}`);
    if (orders.length !== ORDERS_PER_USER || orders.some((o) => o.owner !== user)) problems.push(`RLS returned ${JSON.stringify(orders)}`);
    if (after.cu !== TRUSTED || after.pu !== null || after.n !== 0) problems.push(`after COMMIT: ${JSON.stringify(after)}`);
    // The same request in one round trip: the band leading a multi-statement query.
    const multi = (await c.query(
      `SET QUERY_BAND = 'ProxyUser=${user};' FOR TRANSACTION; SELECT current_user AS cu, trustgate.proxy_user() AS pu, (SELECT count(*)::int FROM trust_bench.orders) AS n`,
    )) as unknown as pg.QueryResult[];
    const one = Array.isArray(multi) ? multi[1]?.rows[0] : undefined;
    if (!one || one.cu !== user || one.pu !== user || one.n !== ORDERS_PER_USER) problems.push(`band-led request: ${JSON.stringify(one ?? multi)}`);
    const after2 = (await c.query('SELECT current_user AS cu, trustgate.proxy_user() AS pu')).rows[0];
    if (after2.cu !== TRUSTED || after2.pu !== null) problems.push(`after the band-led request: ${JSON.stringify(after2)}`);
    if (problems.length) throw new Error(`sanity check of a proxied request failed: ${problems.join('; ')}`);
  });
  log(`sanity check: ${user} sees its ${ORDERS_PER_USER} orders under a FOR TRANSACTION band (separate statement and leading one query), ${TRUSTED} again after each`);
}

// ------------------------------------------------------------------ scenarios and pgbench

interface Scenario {
  id: ScenarioId;
  title: string;
  target: 'trustgate' | 'direct';
  user: string;
  password: string;
  /** pgbench -C: a new connection (SCRAM logon) for every transaction. */
  connectPerRequest: boolean;
  script: string;
}

const SELECT_ITEM = 'SELECT name FROM trust_bench.items WHERE id = :id;';

function scenarios(users: number): Scenario[] {
  const logonUser = proxyName(Math.max(1, Math.floor(users / 3)));
  const band = `SET QUERY_BAND = 'ProxyUser=pu_:p;' FOR TRANSACTION;`;
  return [
    {
      id: 'a',
      title: `no proxy: BEGIN; SELECT; COMMIT through trustgate as ${TRUSTED}`,
      target: 'trustgate',
      user: TRUSTED,
      password: TRUSTED_PASSWORD,
      connectPerRequest: false,
      script: `\\set id random(1, ${ITEMS})\nBEGIN;\n${SELECT_ITEM}\nCOMMIT;\n`,
    },
    {
      id: 'b',
      title: `proxy: BEGIN; SET QUERY_BAND ProxyUser=<random of ${users}> FOR TRANSACTION; SELECT; COMMIT through trustgate`,
      target: 'trustgate',
      user: TRUSTED,
      password: TRUSTED_PASSWORD,
      connectPerRequest: false,
      script: `\\set id random(1, ${ITEMS})\n\\set p random(1, ${users})\nBEGIN;\n${band}\n${SELECT_ITEM}\nCOMMIT;\n`,
    },
    {
      id: 'b2',
      title: `proxy as (b), the SELECT on the RLS table (policy owner = (SELECT trustgate.proxy_user()), ${ORDERS_PER_USER} rows per user)`,
      target: 'trustgate',
      user: TRUSTED,
      password: TRUSTED_PASSWORD,
      connectPerRequest: false,
      script: `\\set p random(1, ${users})\nBEGIN;\n${band}\nSELECT id, item FROM trust_bench.orders;\nCOMMIT;\n`,
    },
    {
      id: 'a1',
      title: `no proxy, one round trip: SELECT (autocommit) through trustgate as ${TRUSTED}`,
      target: 'trustgate',
      user: TRUSTED,
      password: TRUSTED_PASSWORD,
      connectPerRequest: false,
      script: `\\set id random(1, ${ITEMS})\n${SELECT_ITEM}\n`,
    },
    {
      id: 'b1',
      title: `proxy, one round trip: SET QUERY_BAND ProxyUser=<random of ${users}> FOR TRANSACTION; SELECT as one query through trustgate`,
      target: 'trustgate',
      user: TRUSTED,
      password: TRUSTED_PASSWORD,
      connectPerRequest: false,
      // \; keeps both statements in one pgbench command, sent as one Query message.
      script: `\\set id random(1, ${ITEMS})\n\\set p random(1, ${users})\n${band.replace(/;$/, '')}\\; ${SELECT_ITEM}\n`,
    },
    {
      id: 'c',
      title: `logon per request: new SCRAM connection as ${logonUser} directly to PostgreSQL, SELECT, disconnect`,
      target: 'direct',
      user: logonUser,
      password: PROXY_PASSWORD,
      connectPerRequest: true,
      script: `\\set id random(1, ${ITEMS})\n${SELECT_ITEM}\n`,
    },
    {
      id: 'c-tg',
      title: `logon per request through trustgate: new SCRAM connection as ${logonUser}, SELECT (pooled server connection), disconnect`,
      target: 'trustgate',
      user: logonUser,
      password: PROXY_PASSWORD,
      connectPerRequest: true,
      script: `\\set id random(1, ${ITEMS})\n${SELECT_ITEM}\n`,
    },
    {
      id: 'd',
      title: `reference: (a) directly against PostgreSQL as ${TRUSTED}`,
      target: 'direct',
      user: TRUSTED,
      password: TRUSTED_PASSWORD,
      connectPerRequest: false,
      script: `\\set id random(1, ${ITEMS})\nBEGIN;\n${SELECT_ITEM}\nCOMMIT;\n`,
    },
    {
      id: 'e',
      title: `reference: BEGIN; SET LOCAL ROLE pu_<random of ${users}>; SELECT; COMMIT directly against PostgreSQL as ${TRUSTED}`,
      target: 'direct',
      user: TRUSTED,
      password: TRUSTED_PASSWORD,
      connectPerRequest: false,
      script: `\\set id random(1, ${ITEMS})\n\\set p random(1, ${users})\nBEGIN;\nSET LOCAL ROLE pu_:p;\n${SELECT_ITEM}\nCOMMIT;\n`,
    },
    {
      id: 'd1',
      title: `reference: (a1) directly against PostgreSQL as ${TRUSTED}`,
      target: 'direct',
      user: TRUSTED,
      password: TRUSTED_PASSWORD,
      connectPerRequest: false,
      script: `\\set id random(1, ${ITEMS})\n${SELECT_ITEM}\n`,
    },
    {
      id: 'e1',
      title: `reference: trustgate's switch statement (role, identity token, MAC; is_local) and the SELECT in one query, directly against PostgreSQL as ${TRUSTED}`,
      target: 'direct',
      user: TRUSTED,
      password: TRUSTED_PASSWORD,
      connectPerRequest: false,
      script: `\\set id random(1, ${ITEMS})\n\\set p random(1, ${users})\n${SWITCH_LIKE}\\; ${SELECT_ITEM}\n`,
    },
  ];
}

/**
 * What trustgate sends in front of a band-led request (src/client/session.ts sendBandLed), with a
 * token of the same shape and size as identityToken() makes and a MAC of the same length.
 */
const SWITCH_LIKE = (() => {
  const token = JSON.stringify({ v: 1, pid: 123456, tu: TRUSTED, pu: 'pu_:p', pr: null, k: 'permanent', role: 'pu_:p', qb: 'ProxyUser=pu_:p;', tb: 'ProxyUser=pu_:p;', sb: null });
  return (
    `SELECT pg_catalog.set_config('role', $$pu_:p$$, true), pg_catalog.set_config('trustgate.identity', $$${token}$$, true), ` +
    `pg_catalog.set_config('trustgate.identity_mac', $$${'5f'.repeat(32)}$$, true)`
  );
})();

interface Measurement extends PgbenchSummary {
  id: ScenarioId;
  title: string;
  command: string;
  status: 'ok' | 'failed' | 'skipped';
  /** CPU of the whole benchmark (pgbench, trustgate, PostgreSQL) per transaction (µs): less noise-prone than tps. */
  cpuUsPerTxn?: number;
  /** trustgate process CPU per transaction (µs), for scenarios through trustgate. */
  gatewayCpuUsPerTxn?: number;
  gatewayCpuPct?: number;
  /** trustgate read / write system calls per transaction (client and server sockets together). */
  gatewayReadsPerTxn?: number;
  gatewayWritesPerTxn?: number;
  foreignCpuPct?: number;
  /** With --rounds > 1: the tps of every run (the measurement shown is the median run). */
  allTps?: number[];
  error?: string;
}

function pgbenchArgs(s: Scenario, scriptFile: string, port: number, clients: number, duration: number): string[] {
  const args = ['-n', '-M', 'simple', '-f', scriptFile, '-T', String(duration), '-c', String(clients), '-j', String(Math.min(clients, 2))];
  if (s.connectPerRequest) args.push('-C');
  args.push(...pgbenchTarget(port, s.user, DB));
  return args;
}

async function pgbench(s: Scenario, scriptFile: string, port: number, clients: number, duration: number, gatewayPid?: number): Promise<Measurement> {
  const args = pgbenchArgs(s, scriptFile, port, clients, duration);
  const command = `PGPASSWORD=… pgbench ${args.join(' ')}`;
  const r = await runPgbench(args, s.password, duration * 1000 + 120_000, gatewayPid);
  const { tps, latencyMs, transactions, failedTransactions, foreignCpuPct } = r;
  const m: Measurement = { id: s.id, title: s.title, command, status: 'ok', tps, latencyMs, transactions, failedTransactions, foreignCpuPct };
  if (r.treeCpuUsPerTxn !== undefined) m.cpuUsPerTxn = r.treeCpuUsPerTxn;
  if (r.poolerCpu) {
    m.gatewayCpuUsPerTxn = r.poolerCpu.usPerTxn;
    m.gatewayCpuPct = r.poolerCpu.pctOfCore;
  }
  if (r.poolerSyscalls) {
    m.gatewayReadsPerTxn = r.poolerSyscalls.readsPerTxn;
    m.gatewayWritesPerTxn = r.poolerSyscalls.writesPerTxn;
  }
  // pgbench can exit 0 with a summary although clients aborted.
  const aborted = /client \d+ aborted|aborted in command/.test(r.output);
  if (r.exit.code !== 0 || tps === null || aborted) {
    m.status = 'failed';
    m.error = pgbenchFailure(r, 4, 800);
  }
  return m;
}

// ------------------------------------------------------------------ report

const fmtRatio = (n: number | null) => (n === null ? '–' : n >= 10 ? `${n.toFixed(1)}×` : `${n.toFixed(2)}×`);
const ratio = (x: number | null | undefined, y: number | null | undefined) => (x && y ? x / y : null);

interface Verdicts {
  proxyVsNoProxy: number | null;
  proxyVsLogon: number | null;
  proxyVsLogonThroughTrustgate: number | null;
  rlsProxyVsNoProxy: number | null;
  rlsProxyVsLogon: number | null;
  gatewayVsDirect: number | null;
  nativeSwitchVsPlain: number | null;
  oneTripProxyVsNoProxy: number | null;
  oneTripProxyVsLogon: number | null;
  nativeOneTripSwitchVsPlain: number | null;
  /** The same two target ratios from CPU per transaction instead of tps (what a quiet box would show if CPU-bound). */
  proxyVsNoProxyByCpu: number | null;
  proxyVsLogonByCpu: number | null;
  oneTripProxyVsNoProxyByCpu: number | null;
  targets: { name: string; measured: number | null; target: number; met: boolean | null }[];
}

function verdicts(results: Map<ScenarioId, Measurement>): Verdicts {
  const tps = (id: ScenarioId) => {
    const m = results.get(id);
    return m && m.status === 'ok' ? m.tps : null;
  };
  const cpu = (id: ScenarioId) => {
    const m = results.get(id);
    return m && m.status === 'ok' ? (m.cpuUsPerTxn ?? null) : null;
  };
  const v = {
    proxyVsNoProxy: ratio(tps('b'), tps('a')),
    proxyVsLogon: ratio(tps('b'), tps('c')),
    proxyVsLogonThroughTrustgate: ratio(tps('b'), tps('c-tg')),
    rlsProxyVsNoProxy: ratio(tps('b2'), tps('a')),
    rlsProxyVsLogon: ratio(tps('b2'), tps('c')),
    gatewayVsDirect: ratio(tps('a'), tps('d')),
    nativeSwitchVsPlain: ratio(tps('e'), tps('d')),
    oneTripProxyVsNoProxy: ratio(tps('b1'), tps('a1')),
    nativeOneTripSwitchVsPlain: ratio(tps('e1'), tps('d1')),
    oneTripProxyVsLogon: ratio(tps('b1'), tps('c')),
    proxyVsNoProxyByCpu: ratio(cpu('a'), cpu('b')),
    proxyVsLogonByCpu: ratio(cpu('c'), cpu('b')),
    oneTripProxyVsNoProxyByCpu: ratio(cpu('a1'), cpu('b1')),
  };
  const target = (name: string, measured: number | null, t: number) => ({ name, measured, target: t, met: measured === null ? null : measured >= t });
  return {
    ...v,
    targets: [
      target('(b) / (a): proxy vs no proxy (BEGIN; band; SELECT; COMMIT vs BEGIN; SELECT; COMMIT)', v.proxyVsNoProxy, 0.8),
      target('(b) / (c): proxy vs logon per request', v.proxyVsLogon, 20),
      target('(b1) / (a1): proxy vs no proxy, one round trip (band; SELECT vs SELECT)', v.oneTripProxyVsNoProxy, 0.8),
      target('(b1) / (c): one-round-trip proxy vs logon per request', v.oneTripProxyVsLogon, 20),
    ],
  };
}

function resultTable(order: ScenarioId[], results: Map<ScenarioId, Measurement>): string {
  const a = results.get('a');
  const c = results.get('c');
  const aTps = a?.status === 'ok' ? a.tps : null;
  const cTps = c?.status === 'ok' ? c.tps : null;
  const rows = [
    '| scenario | what | tps | latency ms | vs (a) | vs (c) | CPU µs/txn, all processes | trustgate CPU µs/txn | trustgate syscalls/txn (read+write) | CPU of other processes, % of a core |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|',
  ];
  for (const id of order) {
    const m = results.get(id);
    if (!m) continue;
    if (m.status !== 'ok') {
      rows.push(`| (${id}) | ${m.title} | ${m.status} | – | – | – | – | – | – | – |`);
      continue;
    }
    const vsA = id === 'a' ? '1.00×' : fmtRatio(ratio(m.tps, aTps));
    const vsC = id === 'c' ? '1.00×' : fmtRatio(ratio(m.tps, cTps));
    rows.push(`| (${id}) | ${m.title} | ${fmtInt(m.tps)} | ${m.latencyMs?.toFixed(2) ?? '–'} | ${vsA} | ${vsC} | ${m.cpuUsPerTxn ?? '–'} | ${m.gatewayCpuUsPerTxn ?? '–'} | ${m.gatewayReadsPerTxn === undefined ? '–' : `${m.gatewayReadsPerTxn}+${m.gatewayWritesPerTxn}`} | ${m.foreignCpuPct ?? '–'} |`);
  }
  return rows.join('\n');
}

function targetLines(v: Verdicts): string[] {
  const lines = v.targets.map((t) => {
    const verdict = t.met === null ? 'not measured' : t.met ? 'MET' : 'NOT MET';
    return `- ${t.name}: ${fmtRatio(t.measured)} (target ≥ ${t.target}×) — **${verdict}**`;
  });
  lines.push(
    `- the same ratios from CPU per transaction of all processes (less sensitive to other jobs on the box): (b)/(a) ${fmtRatio(v.proxyVsNoProxyByCpu)}, (b)/(c) ${fmtRatio(v.proxyVsLogonByCpu)}, (b1)/(a1) ${fmtRatio(v.oneTripProxyVsNoProxyByCpu)}`,
  );
  return lines;
}

// ------------------------------------------------------------------ main

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  armWatchdog((opts.rounds * opts.scenarios.length * (opts.duration + 60) + 2 * (opts.warmup + 30) + 600) * 1000);

  requireTools(['pgbench']);
  const tmp = makeTempDir('trustgate-bench-trust-');
  const launch = await prepareLauncher(opts, tmp);

  const db = await startPostgres();
  log(`PostgreSQL pid ${db.pid} on port ${db.port}`);
  await installAuthQuery(db);
  let t = Date.now();
  await setupDatabase(db, opts.users);
  log(`created ${opts.users} proxy users (LOGIN, SCRAM password, member of ${READER}) and the tables in ${((Date.now() - t) / 1000).toFixed(1)} s`);
  const [{ server_version: pgVersion }] = await db.query<{ server_version: string }>('SHOW server_version');

  let gateway: GatewayChild | null = await startGatewayChild(launch, gatewayConfig(db, opts.poolSize, opts.logLevel));
  log(`trustgate child pid ${gateway.pid} on port ${gateway.port} (${launchKind(launch)}), transaction mode, pool ${opts.poolSize}`);

  t = Date.now();
  const granted = await grantConnectThrough(gateway.port, opts.users);
  log(`GRANT CONNECT THROUGH ${TRUSTED} TO PERMANENT … WITHOUT ROLE for ${opts.users} users (${Math.ceil(opts.users / GRANT_BATCH)} statements through trustgate) in ${((Date.now() - t) / 1000).toFixed(1)} s; ${granted} active rules`);
  if (granted !== opts.users) throw new Error(`expected ${opts.users} active rules, found ${granted}`);
  await sanityCheck(gateway.port, opts.users);

  const all = scenarios(opts.users);
  const chosen = SCENARIOS.filter((id) => opts.scenarios.includes(id)).map((id) => all.find((s) => s.id === id)!);
  const scriptFile = (s: Scenario) => path.join(tmp, `${s.id}.sql`);
  for (const s of chosen) fs.writeFileSync(scriptFile(s), s.script);
  const portOf = (s: Scenario) => (s.target === 'trustgate' ? gateway!.port : db.port);

  if (opts.warmup > 0) {
    // Warms both targets and prepares trustgate's switch statement on its pooled connections.
    const warm = chosen.filter((s) => !s.connectPerRequest);
    for (const target of ['trustgate', 'direct'] as const) {
      const s = warm.find((x) => x.target === target && x.id.startsWith('b')) ?? warm.find((x) => x.target === target);
      if (!s) continue;
      log(`warm-up ${target} with (${s.id}) for ${opts.warmup} s`);
      const m = await pgbench(s, scriptFile(s), portOf(s), opts.clients, opts.warmup);
      if (m.status !== 'ok') log(`warm-up (${s.id}) failed: ${m.error}`);
    }
    gateway.takeLines();
  }

  // With --rounds > 1 the scenarios run interleaved, round after round; each scenario reports the
  // run with its median tps (all runs' tps are in the JSON), which damps noise from other jobs.
  const runs = new Map<ScenarioId, Measurement[]>(chosen.map((s) => [s.id, []]));
  const total = chosen.length * opts.rounds;
  let i = 0;
  for (let round = 1; round <= opts.rounds; round++) {
    for (const s of chosen) {
      if (wasInterrupted()) throw new Error('interrupted');
      i++;
      const m = await pgbench(s, scriptFile(s), portOf(s), opts.clients, opts.duration, s.target === 'trustgate' ? gateway.pid : undefined);
      runs.get(s.id)!.push(m);
      const gwLines = gateway.takeLines();
      log(
        `[${i}/${total}] (${s.id}) ${m.status === 'ok' ? `${fmtInt(m.tps).padStart(7)} tps  ${m.latencyMs?.toFixed(2)} ms` : `FAILED: ${m.error}`}` +
          (m.gatewayCpuUsPerTxn !== undefined ? `  trustgate ${m.gatewayCpuUsPerTxn} µs CPU/txn (${m.gatewayCpuPct}% of a core)` : '') +
          (m.gatewayReadsPerTxn !== undefined ? `, ${m.gatewayReadsPerTxn}+${m.gatewayWritesPerTxn} syscalls/txn` : '') +
          (m.foreignCpuPct !== undefined && m.foreignCpuPct >= 10 ? `  [other processes used ${m.foreignCpuPct}% of a core]` : ''),
      );
      if (m.status !== 'ok' && gwLines.length) log(`trustgate wrote during (${s.id}) (last lines):\n${gwLines.slice(-20).join('\n')}`);
      else if (gwLines.length) log(`trustgate wrote ${gwLines.length} log lines during (${s.id}); first: ${gwLines[0].slice(0, 300)}`);
      if (exited(gateway.cp)) throw new Error(`trustgate child died:\n${gateway.tail()}`);
    }
  }
  const results = new Map<ScenarioId, Measurement>();
  for (const [id, list] of runs) {
    const failed = list.find((m) => m.status !== 'ok');
    if (failed) {
      results.set(id, failed);
      continue;
    }
    const sorted = [...list].sort((x, y) => (x.tps ?? 0) - (y.tps ?? 0));
    results.set(id, { ...sorted[Math.floor((sorted.length - 1) / 2)], allTps: list.map((m) => m.tps ?? 0) });
  }
  await gateway.stop();
  gateway = null;

  // ---------------------------------------------------------------- report
  const v = verdicts(results);
  const date = new Date().toISOString();
  const machine = describeMachine(pgVersion);
  const settings = {
    duration: opts.duration,
    clients: opts.clients,
    pgbenchThreads: Math.min(opts.clients, 2),
    proxyUsers: opts.users,
    poolSize: opts.poolSize,
    poolMode: 'transaction',
    warmup: opts.warmup,
    rounds: opts.rounds,
    postgres: { ...POSTGRES_SETTINGS, password_encryption: 'scram-sha-256 (4096 iterations)' },
    trustgate: `separate process (${launchKind(launch)}), log level ${opts.logLevel}, auth scram-sha-256 via auth query`,
    gatewayModule: launch.gatewayModule ? path.relative(ROOT, fileURLToPath(launch.gatewayModule)) : 'src/ via tsx',
    code: process.env.TRUSTGATE_BENCH_GATEWAY_MODULE ? { note: 'TRUSTGATE_BENCH_GATEWAY_MODULE: another build' } : gitState(),
    protocol: 'simple (pgbench substitutes :p inside the band literal only in simple mode)',
  };
  const order = chosen.map((s) => s.id);
  const table = resultTable(order, results);
  const noise = Math.max(0, ...[...runs.values()].flat().map((m) => m.foreignCpuPct ?? 0));
  const scripts = chosen.map((s) => ({ id: s.id, script: s.script, command: results.get(s.id)?.command }));
  fs.mkdirSync(opts.out, { recursive: true });
  fs.writeFileSync(
    path.join(opts.out, 'trust-latest.json'),
    `${JSON.stringify({ date, machine, settings, scenarios: order.map((id) => results.get(id)), ratios: { ...v, targets: undefined }, targets: v.targets, scripts }, null, 2)}\n`,
  );
  const md = [
    '# trustgate benchmark: trusted sessions (identity switch vs logon per end user)',
    '',
    `- date: ${date}`,
    `- machine: ${machine.cores} cores (${machine.cpu}), ${machine.memoryGiB} GiB, ${machine.kernel}; node ${machine.node}; PostgreSQL ${machine.postgres} (embedded); ${machine.pgbench}`,
    `- code: ${'commit' in settings.code ? `commit ${settings.code.commit}${settings.code.dirtySrc.length ? ` plus uncommitted changes in ${settings.code.dirtySrc.join(', ')}` : ''}` : settings.code.note}; gateway module ${settings.gatewayModule}`,
    `- ${opts.users} permanent proxy users (GRANT CONNECT THROUGH ${TRUSTED} TO PERMANENT … WITHOUT ROLE, ${GRANT_BATCH} per statement, through trustgate); trustgate in its own process, transaction mode, pool ${opts.poolSize}`,
    `- every scenario: pgbench -M simple, ${opts.clients} clients, -j ${settings.pgbenchThreads}, ${opts.duration} s, after ${opts.warmup} s unrecorded warm-up per target${opts.rounds > 1 ? `; ${opts.rounds} interleaved rounds, each scenario's median run shown` : ''}; clients authenticate with SCRAM-SHA-256; 127.0.0.1 TCP; pgbench, trustgate and PostgreSQL share the same cores`,
    '- (b), (b2), (b1): each transaction asserts a random one of the proxy users, so consecutive requests on a pooled server connection are (almost always) different end users',
    `- (c): pgbench -C, one end user for the whole run (pgbench cannot vary the user per connection); a new PostgreSQL backend and a full SCRAM exchange (client and server side) per request either way`,
    `- noise: CPU used by processes outside the benchmark during a scenario was at most ${noise}% of one core${noise >= 10 ? ' — other jobs shared this 2-core box, so absolute tps and the ratios are less reliable (see the last column)' : ''}`,
    '',
    table,
    '',
    '## Targets',
    '',
    ...targetLines(v),
    '',
    `Other ratios: (b)/(c-tg) ${fmtRatio(v.proxyVsLogonThroughTrustgate)}, (b2)/(a) ${fmtRatio(v.rlsProxyVsNoProxy)}, (b2)/(c) ${fmtRatio(v.rlsProxyVsLogon)}, (a)/(d) trustgate vs direct ${fmtRatio(v.gatewayVsDirect)}, (e)/(d) the same switch by hand in PostgreSQL ${fmtRatio(v.nativeSwitchVsPlain)}, (e1)/(d1) trustgate's switch statement run by hand in PostgreSQL ${fmtRatio(v.nativeOneTripSwitchVsPlain)}.`,
    '',
    'How to read (e)/(d) and (e1)/(d1): they are what PostgreSQL alone, without trustgate, loses when every request switches the role first; a gateway cannot do better than these for (b)/(a) and (b1)/(a1) on the same workload.',
    '',
    '## pgbench scripts and commands',
    '',
  ];
  for (const s of scripts) md.push(`(${s.id}) \`${s.command ?? ''}\``, '', '```', s.script.trimEnd(), '```', '');
  const failures = [...results.values()].filter((m) => m.status !== 'ok');
  if (failures.length) md.push('## Failures', '', ...failures.map((m) => `- (${m.id}): ${m.error}`), '');
  fs.writeFileSync(path.join(opts.out, 'trust-latest.md'), md.join('\n'));

  console.log(`\n${table}\n`);
  console.log(targetLines(v).join('\n').replace(/\*\*/g, ''));
  console.log(`other ratios: (b)/(c-tg) ${fmtRatio(v.proxyVsLogonThroughTrustgate)}, (b2)/(a) ${fmtRatio(v.rlsProxyVsNoProxy)}, (b2)/(c) ${fmtRatio(v.rlsProxyVsLogon)}, (a)/(d) ${fmtRatio(v.gatewayVsDirect)}, (e)/(d) ${fmtRatio(v.nativeSwitchVsPlain)}, (e1)/(d1) ${fmtRatio(v.nativeOneTripSwitchVsPlain)}`);
  console.log(`\nresults: ${path.relative(process.cwd(), path.join(opts.out, 'trust-latest.md'))}, trust-latest.json`);
  if (failures.length) throw new Error(`${failures.length} scenario(s) failed: ${failures.map((m) => m.id).join(', ')}`);
}

runBenchmark(main);
