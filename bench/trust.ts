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
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath, pathToFileURL } from 'node:url';
import pg from 'pg';
import ts from 'typescript';
import { EmbeddedPostgres } from '../src/embedded/postgres.js';
import { installAuthFunction } from '../src/server/install.js';
import { createLogger } from '../src/log/logger.js';

// ------------------------------------------------------------------ options

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const SCENARIOS = ['a', 'b', 'b2', 'a1', 'b1', 'c', 'c-tg', 'd', 'e', 'd1', 'e1'] as const;
type ScenarioId = (typeof SCENARIOS)[number];

interface Options {
  duration: number;
  clients: number;
  users: number;
  poolSize: number;
  warmup: number;
  rounds: number;
  scenarios: ScenarioId[];
  logLevel: string;
  build: boolean;
  out: string;
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
  const int = (v: string, flag: string, min = 1) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min) throw new Error(`${flag}: "${v}" is not an integer ≥ ${min}`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const eq = a.indexOf('=');
    const flag = eq > 0 ? a.slice(0, eq) : a;
    const value = () => {
      if (eq > 0) return a.slice(eq + 1);
      const v = argv[++i];
      if (v === undefined) throw new Error(`${flag} needs a value`);
      return v;
    };
    switch (flag) {
      case '--duration':
        o.duration = int(value(), flag);
        break;
      case '--clients':
        o.clients = int(value(), flag);
        break;
      case '--users':
        o.users = int(value(), flag);
        break;
      case '--pool-size':
        o.poolSize = int(value(), flag);
        break;
      case '--warmup':
        o.warmup = int(value(), flag, 0);
        break;
      case '--rounds':
        o.rounds = int(value(), flag);
        break;
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
      case '--no-build':
        o.build = false;
        break;
      case '--out':
        o.out = path.resolve(value());
        break;
      case '-h':
      case '--help':
        console.log(USAGE);
        process.exit(0);
        break;
      default:
        throw new Error(`unknown option ${a}\n${USAGE}`);
    }
  }
  if (o.duration > 600) throw new Error('--duration: at most 600 s per scenario');
  if (o.users > 100_000) throw new Error('--users: at most 100000');
  if (o.clients > 300) throw new Error('--clients: at most 300 (max_connections 400 is shared with the pools)');
  return o;
}

// ------------------------------------------------------------------ process plumbing

const t0 = Date.now();
function log(msg: string): void {
  process.stderr.write(`[bench:trust ${((Date.now() - t0) / 1000).toFixed(1).padStart(6)}s] ${msg}\n`);
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

const children = new Set<ChildProcess>();
function track(cp: ChildProcess): ChildProcess {
  children.add(cp);
  cp.once('exit', () => children.delete(cp));
  return cp;
}

function exited(cp: ChildProcess): boolean {
  return cp.exitCode !== null || cp.signalCode !== null;
}

/** SIGTERM, then SIGKILL after `graceMs`; resolves when the process is gone (bounded). */
async function killChild(cp: ChildProcess, graceMs = 5000): Promise<void> {
  if (exited(cp)) return;
  const gone = new Promise<void>((r) => cp.once('exit', () => r()));
  cp.kill('SIGTERM');
  if (!(await Promise.race([gone.then(() => true), sleep(graceMs).then(() => false)])) && !exited(cp)) {
    cp.kill('SIGKILL');
    await Promise.race([gone, sleep(2000)]);
  }
}

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

/** Runs a command to completion, killing it after `timeoutMs`. */
function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs: number; cwd?: string }): Promise<RunResult> {
  return new Promise((resolve) => {
    const cp = track(spawn(cmd, args, { env: opts.env ?? process.env, cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'] }));
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    const cap = (s: string, add: string) => (s.length > 1_000_000 ? s : s + add);
    cp.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout = cap(stdout, d)));
    cp.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr = cap(stderr, d)));
    const timer = setTimeout(() => {
      timedOut = true;
      cp.kill('SIGTERM');
      setTimeout(() => cp.kill('SIGKILL'), 3000).unref();
    }, opts.timeoutMs);
    cp.once('error', (err) => {
      clearTimeout(timer);
      resolve({ code: -1, stdout, stderr: stderr + String(err), timedOut });
    });
    cp.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr, timedOut });
    });
  });
}

function tailKeeper(max = 60): { push: (line: string) => void; text: () => string } {
  const lines: string[] = [];
  return {
    push: (line) => {
      lines.push(line);
      if (lines.length > max) lines.shift();
    },
    text: () => lines.join('\n'),
  };
}

// CPU accounting (as bench/run.ts): the pooler's own CPU per transaction, and how much CPU
// processes outside this benchmark's tree used during a scenario (noise on a shared box).
const CLK_TCK = 100;
interface CpuSnapshot {
  busy: number;
  ours: number;
  at: number;
}

function cpuSnapshot(): CpuSnapshot {
  const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  const busy = f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] ?? 0);
  const stats = new Map<number, { ppid: number; cpu: number }>();
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const st = fs.readFileSync(`/proc/${d}/stat`, 'utf8');
      const x = st.slice(st.lastIndexOf(')') + 2).split(' ');
      stats.set(Number(d), { ppid: Number(x[1]), cpu: Number(x[11]) + Number(x[12]) + Number(x[13]) + Number(x[14]) });
    } catch {
      /* gone */
    }
  }
  const kids = new Map<number, number[]>();
  for (const [pid, s] of stats) {
    const k = kids.get(s.ppid);
    if (k) k.push(pid);
    else kids.set(s.ppid, [pid]);
  }
  let ours = 0;
  const stack = [process.pid];
  for (let n = 0; stack.length && n < 100_000; n++) {
    const pid = stack.pop()!;
    ours += stats.get(pid)?.cpu ?? 0;
    for (const c of kids.get(pid) ?? []) stack.push(c);
  }
  return { busy, ours, at: Date.now() };
}

function processCpuTicks(pid: number): number {
  try {
    const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const x = st.slice(st.lastIndexOf(')') + 2).split(' ');
    return Number(x[11]) + Number(x[12]);
  } catch {
    return NaN;
  }
}

/** Read and write system calls of one process so far (/proc/<pid>/io), or null. */
function processSyscalls(pid: number): { r: number; w: number } | null {
  try {
    const io = fs.readFileSync(`/proc/${pid}/io`, 'utf8');
    const r = /^syscr:\s+(\d+)/m.exec(io);
    const w = /^syscw:\s+(\d+)/m.exec(io);
    return r && w ? { r: Number(r[1]), w: Number(w[1]) } : null;
  } catch {
    return null;
  }
}

function foreignCpuPct(a: CpuSnapshot, b: CpuSnapshot): number {
  const secs = Math.max(0.001, (b.at - a.at) / 1000);
  return Math.round((100 * Math.max(0, b.busy - a.busy - (b.ours - a.ours))) / CLK_TCK / secs);
}

/** The code measured: HEAD and the files under src/ that differ from it (others may be editing). */
function gitState(): { commit: string; dirtySrc: string[] } {
  const head = spawnSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: ROOT, encoding: 'utf8' });
  const st = spawnSync('git', ['status', '--porcelain', '--', 'src'], { cwd: ROOT, encoding: 'utf8' });
  return {
    commit: head.status === 0 ? head.stdout.trim() : 'unknown',
    dirtySrc: st.status === 0 ? st.stdout.split('\n').filter(Boolean).map((l) => l.slice(3)) : [],
  };
}

function versionOf(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 10_000 });
  return (r.stdout || r.stderr || '').split('\n')[0].trim() || 'unknown';
}

// ------------------------------------------------------------------ the database

const DB = 'postgres'; // the catalog lives in the database the auth query uses
const AUTH_ROLE = 'trustgate_auth';
const AUTH_PASSWORD = 'trustgate-auth-bench-password';
const AUTH_ENV = 'TRUSTGATE_BENCH_AUTH_PASSWORD';
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

// ------------------------------------------------------------------ trustgate child

interface GatewayLaunch {
  launcher: string;
  gatewayModule: string | null;
}

async function prepareLauncher(opts: Options, tmp: string): Promise<GatewayLaunch> {
  if (opts.build) {
    log('building dist/ (npx tsc -p tsconfig.build.json)');
    const r = await run('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: ROOT, timeoutMs: 300_000 });
    if (r.code !== 0) log(`warning: tsc -p tsconfig.build.json exited ${r.code}:\n${(r.stdout + r.stderr).slice(-2000)}`);
  }
  const dist = process.env.TRUSTGATE_BENCH_GATEWAY_MODULE ? path.resolve(process.env.TRUSTGATE_BENCH_GATEWAY_MODULE) : path.join(ROOT, 'dist', 'gateway.js');
  const distOk = fs.existsSync(dist);
  if (!distOk) log('warning: dist/gateway.js missing; the gateway child runs src/ through tsx');
  const js = ts.transpileModule(fs.readFileSync(path.join(ROOT, 'bench', 'gateway-process.ts'), 'utf8'), {
    compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 },
    fileName: 'gateway-process.ts',
  }).outputText;
  const launcher = path.join(tmp, 'gateway-process.mjs');
  fs.writeFileSync(launcher, js);
  return { launcher, gatewayModule: distOk ? pathToFileURL(dist).href : null };
}

interface GatewayChild {
  cp: ChildProcess;
  pid: number;
  port: number;
  stop(): Promise<void>;
  tail(): string;
  /** Log lines (of level warn and above, or all at --log-level debug) since the last call. */
  takeLines(): string[];
}

async function startGatewayChild(launch: GatewayLaunch, config: Record<string, unknown>): Promise<GatewayChild> {
  const nodeArgs = (process.env.TRUSTGATE_BENCH_NODE_FLAGS ?? '').split(/\s+/).filter(Boolean);
  if (launch.gatewayModule) nodeArgs.push(launch.launcher);
  else nodeArgs.push('--import', 'tsx', path.join(ROOT, 'bench', 'gateway-process.ts'));
  const env: NodeJS.ProcessEnv = { ...process.env, TRUSTGATE_BENCH_CONFIG: JSON.stringify(config), [AUTH_ENV]: AUTH_PASSWORD };
  if (launch.gatewayModule) env.TRUSTGATE_GATEWAY_MODULE = launch.gatewayModule;
  else delete env.TRUSTGATE_GATEWAY_MODULE;
  const cp = track(spawn(process.execPath, nodeArgs, { cwd: ROOT, env, stdio: ['pipe', 'pipe', 'pipe'] }));
  const tail = tailKeeper();
  let recent: string[] = [];
  const keep = (line: string) => {
    tail.push(line);
    if (recent.length < 10_000) recent.push(line);
  };
  let resolveHello: (v: { port: number; pid: number }) => void = () => undefined;
  const hello = new Promise<{ port: number; pid: number }>((r) => (resolveHello = r));
  readline.createInterface({ input: cp.stdout! }).on('line', (line) => {
    if (line.startsWith('{"port":')) {
      try {
        resolveHello(JSON.parse(line) as { port: number; pid: number });
        return;
      } catch {
        /* a log line */
      }
    }
    keep(line);
  });
  readline.createInterface({ input: cp.stderr! }).on('line', keep);
  cp.stdin!.on('error', () => undefined);
  const failed = new Promise<never>((_, reject) => {
    cp.once('exit', (code) => reject(new Error(`trustgate child exited during startup (code ${code}):\n${tail.text()}`)));
    setTimeout(() => reject(new Error(`trustgate child did not start within 60 s:\n${tail.text()}`)), 60_000).unref();
  });
  failed.catch(() => undefined);
  let h: { port: number; pid: number };
  try {
    h = await Promise.race([hello, failed]);
  } catch (err) {
    await killChild(cp);
    throw err;
  }
  return {
    cp,
    pid: h.pid,
    port: h.port,
    async stop() {
      if (exited(cp)) return;
      const gone = new Promise<void>((r) => cp.once('exit', () => r()));
      cp.stdin!.write('stop\n');
      if (!(await Promise.race([gone.then(() => true), sleep(15_000).then(() => false)]))) await killChild(cp);
    },
    tail: tail.text,
    takeLines() {
      const r = recent;
      recent = [];
      return r;
    },
  };
}

function gatewayConfig(db: EmbeddedPostgres, opts: Options): Record<string, unknown> {
  return {
    listen: { host: '127.0.0.1', port: 0 },
    server: { host: db.host, port: db.port, tls: { mode: 'disable' } },
    auth: { method: 'scram-sha-256', user: AUTH_ROLE, password_env: AUTH_ENV, database: DB },
    pool: { mode: 'transaction', default_size: opts.poolSize, max_client_connections: 11_000, wait_timeout_ms: 120_000 },
    log: { level: opts.logLevel },
  };
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

interface Measurement {
  id: ScenarioId;
  title: string;
  command: string;
  status: 'ok' | 'failed' | 'skipped';
  tps: number | null;
  latencyMs: number | null;
  transactions: number | null;
  failedTransactions: number | null;
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
  args.push('-h', '127.0.0.1', '-p', String(port), '-U', s.user, DB);
  return args;
}

async function pgbench(s: Scenario, scriptFile: string, port: number, clients: number, duration: number, gatewayPid?: number): Promise<Measurement> {
  const args = pgbenchArgs(s, scriptFile, port, clients, duration);
  const command = `PGPASSWORD=… pgbench ${args.join(' ')}`;
  const env = { ...process.env, PGPASSWORD: s.password, PGSSLMODE: 'disable', PGCONNECT_TIMEOUT: '60', PGAPPNAME: 'pgbench' };
  const before = cpuSnapshot();
  const gwBefore = gatewayPid ? processCpuTicks(gatewayPid) : NaN;
  const ioBefore = gatewayPid ? processSyscalls(gatewayPid) : null;
  const r = await run('pgbench', args, { env, timeoutMs: duration * 1000 + 120_000 });
  const gwTicks = gatewayPid ? processCpuTicks(gatewayPid) - gwBefore : NaN;
  const ioAfter = gatewayPid ? processSyscalls(gatewayPid) : null;
  const after = cpuSnapshot();
  const out = `${r.stdout}\n${r.stderr}`;
  const num = (re: RegExp) => {
    const m = re.exec(out);
    return m ? Number(m[1]) : null;
  };
  // "(without initial connection time)", or with -C "(including reconnection times)".
  const tps = num(/^tps = ([\d.]+) \(/m);
  const latencyMs = num(/^latency average = ([\d.]+) ms/m);
  const transactions = num(/^number of transactions actually processed: (\d+)/m);
  const failedTransactions = num(/^number of failed transactions: (\d+)/m);
  const m: Measurement = { id: s.id, title: s.title, command, status: 'ok', tps, latencyMs, transactions, failedTransactions, foreignCpuPct: foreignCpuPct(before, after) };
  if (transactions) m.cpuUsPerTxn = Math.round(((after.ours - before.ours) / CLK_TCK) * 1e6 / transactions);
  if (Number.isFinite(gwTicks) && transactions) {
    m.gatewayCpuUsPerTxn = Math.round((10 * ((gwTicks / CLK_TCK) * 1e6)) / transactions) / 10;
    m.gatewayCpuPct = Math.round((100 * gwTicks) / CLK_TCK / Math.max(0.001, (after.at - before.at) / 1000));
  }
  if (ioBefore && ioAfter && transactions) {
    m.gatewayReadsPerTxn = Math.round((10 * (ioAfter.r - ioBefore.r)) / transactions) / 10;
    m.gatewayWritesPerTxn = Math.round((10 * (ioAfter.w - ioBefore.w)) / transactions) / 10;
  }
  const aborted = /client \d+ aborted|aborted in command/.test(out);
  if (r.code !== 0 || tps === null || aborted) {
    m.status = 'failed';
    const errLines = out
      .split('\n')
      .filter((l) => /error|fatal|abort/i.test(l))
      .slice(0, 4)
      .join(' | ');
    m.error = `${r.timedOut ? 'timed out; ' : ''}exit ${r.code}: ${errLines || out.trim().split('\n').slice(-3).join(' | ')}`.slice(0, 800);
  }
  return m;
}

// ------------------------------------------------------------------ report

const fmtInt = (n: number | null | undefined) => (n === null || n === undefined ? '–' : Math.round(n).toLocaleString('en-US'));
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

const cleanupState: { db?: EmbeddedPostgres; tmp?: string } = {};
let cleaning: Promise<void> | null = null;
function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    await Promise.all([...children].map((cp) => killChild(cp, 3000)));
    if (cleanupState.db) await cleanupState.db.stop().catch((err: unknown) => log(`warning: stopping PostgreSQL: ${String(err)}`));
    if (cleanupState.tmp) fs.rmSync(cleanupState.tmp, { recursive: true, force: true });
  })();
  return cleaning;
}

let interrupted = false;
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.on(sig, () => {
    interrupted = true;
    log(`${sig}: cleaning up`);
    setTimeout(() => process.exit(130), 30_000).unref();
    void cleanup().finally(() => process.exit(130));
  });
}

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  const budgetMs = (opts.rounds * opts.scenarios.length * (opts.duration + 60) + 2 * (opts.warmup + 30) + 600) * 1000;
  setTimeout(() => {
    log(`watchdog: run exceeded ${Math.round(budgetMs / 1000)} s; aborting`);
    void cleanup().finally(() => process.exit(1));
  }, budgetMs).unref();

  if (spawnSync('bash', ['-c', 'command -v pgbench']).status !== 0) throw new Error('pgbench not found (install the PostgreSQL client tools)');
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'trustgate-bench-trust-'));
  cleanupState.tmp = tmp;
  const launch = await prepareLauncher(opts, tmp);

  log('starting embedded PostgreSQL (max_connections 400, shared_buffers 256MB)');
  const db = new EmbeddedPostgres({ settings: { max_connections: 400, shared_buffers: '256MB' } });
  cleanupState.db = db;
  await db.start();
  log(`PostgreSQL pid ${db.pid} on port ${db.port}`);
  await installAuthFunction(
    {
      endpoint: { host: db.host, port: db.port, tls: { mode: 'disable' }, connectTimeoutMs: 10_000 },
      database: DB,
      superuser: db.superuser,
      superuserPassword: db.superuserPassword,
      authRole: AUTH_ROLE,
      authRolePassword: AUTH_PASSWORD,
    },
    createLogger('silent'),
  );
  let t = Date.now();
  await setupDatabase(db, opts.users);
  log(`created ${opts.users} proxy users (LOGIN, SCRAM password, member of ${READER}) and the tables in ${((Date.now() - t) / 1000).toFixed(1)} s`);
  const [{ server_version: pgVersion }] = await db.query<{ server_version: string }>('SHOW server_version');

  let gateway: GatewayChild | null = await startGatewayChild(launch, gatewayConfig(db, opts));
  log(`trustgate child pid ${gateway.pid} on port ${gateway.port} (${launch.gatewayModule ? 'node dist/' : 'tsx src/'}), transaction mode, pool ${opts.poolSize}`);

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
      if (interrupted) throw new Error('interrupted');
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
  const machine = {
    cores: os.cpus().length,
    cpu: os.cpus()[0]?.model ?? 'unknown',
    memoryGiB: Math.round(os.totalmem() / 2 ** 30),
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    postgres: pgVersion,
    pgbench: versionOf('pgbench', ['--version']),
  };
  const settings = {
    duration: opts.duration,
    clients: opts.clients,
    pgbenchThreads: Math.min(opts.clients, 2),
    proxyUsers: opts.users,
    poolSize: opts.poolSize,
    poolMode: 'transaction',
    warmup: opts.warmup,
    rounds: opts.rounds,
    postgres: { max_connections: 400, shared_buffers: '256MB', password_encryption: 'scram-sha-256 (4096 iterations)' },
    trustgate: `separate process (${launch.gatewayModule ? 'node dist/' : 'tsx src/'}), log level ${opts.logLevel}, auth scram-sha-256 via auth query`,
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

main()
  .then(async () => {
    await cleanup();
    log('done');
    process.exit(0);
  })
  .catch(async (err: unknown) => {
    if (interrupted) log('interrupted');
    else log(`FAILED: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    await cleanup();
    process.exit(interrupted ? 130 : 1);
  });
