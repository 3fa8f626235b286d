/**
 * Query-log benchmark (issue 4): what recording every request costs, audit on vs off.
 *
 *   npm run bench:audit                               # defaults: 32 clients, 10 s per cell, 3 rounds
 *   npm run bench:audit -- --quick                    # 3 s per cell, 1 round (also TRUSTGATE_BENCH_AUDIT_QUICK=1)
 *   npm run bench:audit -- --variants a,b --workloads simple --rounds 1
 *
 * One embedded PostgreSQL (pgbench -i -s 10 in database bench; trustgate's catalog and audit schema
 * in postgres, the audit database) and one trustgate child process per audit variant, all running
 * at once (transaction pool mode, pool 20, clients authenticate with SCRAM), each idle while
 * another is measured:
 *
 *   (a) audit off
 *   (b) audit on: the database writer with the defaults (statement_text full, batches of 1000 or every 100 ms)
 *   (c) audit on: statement_text fingerprint
 *   (d) audit on: JSON lines to a file only (database: false)
 *
 * Workloads (pgbench, 32 clients, -j 2): `-S -M simple`, `-S -M extended`, and `trust`: BEGIN;
 * SET QUERY_BAND = 'ProxyUser=pu_<random>;' FOR TRANSACTION; SELECT one row; COMMIT as app_tier
 * (bench/trust.ts (b); four requests per transaction), the latter with (a) and (b) only. The
 * cells run interleaved, round after round (the variant order rotates each round); each cell
 * reports its median-tps run.
 *
 * Nothing may be dropped: after every cell the benchmark waits until the gateway's writer is idle
 * (SHOW AUDIT on the admin console), counts the rows in trustgate.query_log (or the lines of the
 * JSON lines file) against the transactions pgbench reports, then empties the logs as the
 * superuser (TRUNCATE inside the guard's purge setting; the auth role cannot), so table growth does
 * not skew later cells. Writes bench/results/audit-latest.{json,md}. Target (the issue): (b) ≥ 0.9 × (a).
 * Needs pgbench. Every wait is bounded; all processes and temp dirs are cleaned up at the end, on
 * error and on SIGINT/SIGTERM.
 */
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import type { EmbeddedPostgres } from '../src/embedded/postgres.js';
import {
  ROOT, log, setLogTag, fmtInt, commandLineFlags, runBenchmark, wasInterrupted, armWatchdog, requireTools, makeTempDir, describeMachine,
  run, sleep, POSTGRES_SETTINGS, AUTH_DATABASE, startPostgres, installAuthQuery,
  prepareLauncher, launchKind, startGatewayChild, gatewayConfig, exited, type GatewayChild, type SharedOptions,
  runPgbench, pgbenchTarget, pgbenchEnv, pgbenchFailure, type PgbenchSummary,
  gitState,
} from './common.js';

setLogTag('bench:audit');
const started = Date.now();

// ------------------------------------------------------------------ options

const VARIANTS = ['a', 'b', 'c', 'd'] as const;
type Variant = (typeof VARIANTS)[number];
const WORKLOADS = ['simple', 'extended', 'trust'] as const;
type Workload = (typeof WORKLOADS)[number];
/** The trusted-session workload runs with audit off and on (defaults) only. */
const TRUST_VARIANTS: readonly Variant[] = ['a', 'b'];

const VARIANT_TITLE: Record<Variant, string> = {
  a: 'audit off',
  b: 'audit on: database, defaults (statement_text full)',
  c: 'audit on: database, statement_text fingerprint',
  d: 'audit on: JSON lines to a file only (database: false)',
};
const WORKLOAD_TITLE: Record<Workload, string> = {
  simple: 'pgbench -S, simple',
  extended: 'pgbench -S, extended',
  trust: 'trusted session (BEGIN; SET QUERY_BAND … FOR TRANSACTION; SELECT; COMMIT), simple',
};

interface Options extends SharedOptions {
  duration: number;
  clients: number;
  rounds: number;
  warmup: number;
  poolSize: number;
  scale: number;
  users: number;
  variants: Variant[];
  workloads: Workload[];
  logLevel: string;
}

const USAGE = `usage: npm run bench:audit -- [options]
  --duration <s>        seconds per cell (default 10; env TRUSTGATE_BENCH_AUDIT_DURATION)
  --rounds <n>          interleaved rounds; each cell reports its median run (default 3; env TRUSTGATE_BENCH_AUDIT_ROUNDS)
  --quick               --duration 3 --rounds 1 --warmup 1 --users 100 (env TRUSTGATE_BENCH_AUDIT_QUICK=1)
  --clients <n>         pgbench clients (default 32)
  --warmup <s>          unrecorded warm-up per gateway and workload (default 1, 0 = none)
  --pool-size <n>       trustgate server connections per pool (default 20)
  --scale <n>           pgbench -i scale (default 10)
  --users <n>           proxy users of the trusted-session workload (default 1000)
  --variants <list>     ${VARIANTS.join(',')} (default all): a off, b on (defaults), c fingerprint, d JSON lines only
  --workloads <list>    ${WORKLOADS.join(',')} (default all; trust runs with a and b only)
  --log-level <level>   trustgate log level (default warn)
  --no-build            do not run tsc -p tsconfig.build.json first (uses dist/ if present)
  --out <dir>           results directory (default bench/results)`;

function wholeNumber(v: string, flag: string, min: number): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) throw new Error(`${flag}: "${v}" is not an integer ≥ ${min}`);
  return n;
}

function listOf<T extends string>(v: string, allowed: readonly T[], flag: string): T[] {
  return v.split(',').map((s) => {
    const x = s.trim() as T;
    if (!allowed.includes(x)) throw new Error(`${flag}: "${s}" is not one of ${allowed.join(', ')}`);
    return x;
  });
}

function parseOptions(argv: string[]): Options {
  const o: Options = {
    duration: 10,
    clients: 32,
    rounds: 3,
    warmup: 1,
    poolSize: 20,
    scale: 10,
    users: 1000,
    variants: [...VARIANTS],
    workloads: [...WORKLOADS],
    logLevel: 'warn',
    build: true,
    out: path.join(ROOT, 'bench', 'results'),
  };
  const quick = () => Object.assign(o, { duration: 3, rounds: 1, warmup: 1, users: 100 });
  const env = process.env;
  if (env.TRUSTGATE_BENCH_AUDIT_QUICK && env.TRUSTGATE_BENCH_AUDIT_QUICK !== '0') quick();
  if (env.TRUSTGATE_BENCH_AUDIT_DURATION) o.duration = wholeNumber(env.TRUSTGATE_BENCH_AUDIT_DURATION, 'TRUSTGATE_BENCH_AUDIT_DURATION', 1);
  if (env.TRUSTGATE_BENCH_AUDIT_ROUNDS) o.rounds = wholeNumber(env.TRUSTGATE_BENCH_AUDIT_ROUNDS, 'TRUSTGATE_BENCH_AUDIT_ROUNDS', 1);
  for (const { flag, value, unknown } of commandLineFlags(argv, USAGE, o)) {
    switch (flag) {
      case '--quick':
        quick();
        break;
      case '--duration':
        o.duration = wholeNumber(value(), flag, 1);
        break;
      case '--rounds':
        o.rounds = wholeNumber(value(), flag, 1);
        break;
      case '--clients':
        o.clients = wholeNumber(value(), flag, 1);
        break;
      case '--warmup':
        o.warmup = wholeNumber(value(), flag, 0);
        break;
      case '--pool-size':
        o.poolSize = wholeNumber(value(), flag, 1);
        break;
      case '--scale':
        o.scale = wholeNumber(value(), flag, 1);
        break;
      case '--users':
        o.users = wholeNumber(value(), flag, 1);
        break;
      case '--variants':
        o.variants = listOf(value(), VARIANTS, flag);
        break;
      case '--workloads':
        o.workloads = listOf(value(), WORKLOADS, flag);
        break;
      case '--log-level':
        o.logLevel = value();
        if (!['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'].includes(o.logLevel)) throw new Error(`--log-level: unknown level ${o.logLevel}`);
        break;
      default:
        throw unknown();
    }
  }
  if (o.duration > 600) throw new Error('--duration: at most 600 s per cell');
  if (o.clients > 200) throw new Error('--clients: at most 200 (max_connections 400 is shared by the pools of four gateways)');
  if (o.users > 100_000) throw new Error('--users: at most 100000');
  return o;
}

// ------------------------------------------------------------------ environment


// ------------------------------------------------------------------ the database

const BENCH_USER = 'bench';
const BENCH_PASSWORD = 'bench-password-not-secret';
const BENCH_DB = 'bench';
/** The trusted-session workload lives where the catalog is (the auth database), like bench/trust.ts. */
const TRUST_DB = AUTH_DATABASE;
const TRUSTED = 'app_tier';
const TRUSTED_PASSWORD = 'app-tier-bench-password';
const ADMIN = 'bench_secadm';
const ADMIN_PASSWORD = 'bench-secadm-password';
const READER = 'audit_bench_reader';
const ITEMS = 1000;
const GRANT_BATCH = 25;
/** application_name of the audit writer's server connection (src/audit/writer.ts). */
const WRITER_APP = 'trustgate audit';

async function setupTrust(db: EmbeddedPostgres, users: number): Promise<void> {
  await db.query(`
    CREATE ROLE ${TRUSTED} LOGIN PASSWORD '${TRUSTED_PASSWORD}';
    CREATE ROLE ${ADMIN} LOGIN PASSWORD '${ADMIN_PASSWORD}';
    GRANT trustgate_admin TO ${ADMIN};
    CREATE ROLE ${READER} NOLOGIN;
    CREATE SCHEMA trust_bench;
    GRANT USAGE ON SCHEMA trust_bench TO PUBLIC;
    CREATE TABLE trust_bench.items (id int PRIMARY KEY, name text NOT NULL);
    INSERT INTO trust_bench.items SELECT i, 'item ' || i FROM generate_series(1, ${ITEMS}) AS i;
    GRANT SELECT ON trust_bench.items TO ${READER};
    GRANT ${READER} TO ${TRUSTED};
    ANALYZE trust_bench.items;
  `);
  for (let from = 1; from <= users; from += 100) {
    const names = Array.from({ length: Math.min(100, users - from + 1) }, (_, k) => `pu_${from + k}`);
    await db.query(names.map((n) => `CREATE ROLE ${n} NOLOGIN IN ROLE ${READER};`).join('\n') + `\nGRANT ${names.join(', ')} TO ${ADMIN} WITH ADMIN OPTION;`);
  }
}

function clientConfig(port: number, user: string, password: string, database: string): pg.ClientConfig {
  return { host: '127.0.0.1', port, user, password, database, connectionTimeoutMillis: 30_000, query_timeout: 60_000 };
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

async function grantConnectThrough(port: number, users: number): Promise<void> {
  await withClient(clientConfig(port, ADMIN, ADMIN_PASSWORD, TRUST_DB), async (c) => {
    for (let from = 1; from <= users; from += GRANT_BATCH) {
      const names = Array.from({ length: Math.min(GRANT_BATCH, users - from + 1) }, (_, k) => `pu_${from + k}`);
      const r = await c.query(`GRANT CONNECT THROUGH ${TRUSTED} TO PERMANENT ${names.join(', ')} WITHOUT ROLE`);
      if (r.command !== 'GRANT') throw new Error(`GRANT CONNECT THROUGH answered ${r.command}`);
    }
  });
}

/** One proxied request through a gateway (its rules store learns the grants by NOTIFY: retried briefly). */
async function trustSanityCheck(port: number, users: number, label: string): Promise<void> {
  const user = `pu_${Math.max(1, Math.floor(users / 2))}`;
  let last = '';
  for (let attempt = 0; attempt < 20; attempt++) {
    try {
      const cu = await withClient(clientConfig(port, TRUSTED, TRUSTED_PASSWORD, TRUST_DB), async (c) => {
        await c.query('BEGIN');
        await c.query(`SET QUERY_BAND = 'ProxyUser=${user};' FOR TRANSACTION`);
        const r = (await c.query('SELECT current_user AS cu')).rows[0] as { cu: string };
        await c.query('COMMIT');
        return r.cu;
      });
      if (cu === user) return;
      last = `current_user ${cu}`;
    } catch (err) {
      last = (err as Error).message;
    }
    await sleep(250);
  }
  throw new Error(`gateway (${label}): a proxied request as ${user} failed: ${last}`);
}

/** The superuser's connection to the audit database: counts and empties the logs between cells. */
class AuditDb {
  private constructor(private readonly c: pg.Client) {}

  static async open(db: EmbeddedPostgres): Promise<AuditDb> {
    const c = new pg.Client({ ...db.connectionConfig({ database: AUTH_DATABASE }), connectionTimeoutMillis: 30_000, query_timeout: 120_000 });
    c.on('error', (err) => log(`audit database connection: ${err.message}`));
    await c.connect();
    return new AuditDb(c);
  }

  /** The query log of one instance grouped by statement (fingerprint), and the access log's count. */
  async counts(instance: string | null): Promise<DbCounts> {
    const where = instance === null ? '' : 'WHERE instance = $1';
    const params = instance === null ? [] : [instance];
    const groups = (
      await this.c.query(
        `SELECT statement_fingerprint AS fp, min(statement_kind) AS kind, min(left(statement_text, 80)) AS text, count(*)::int AS n,
                count(DISTINCT client_session)::int AS sessions, count(*) FILTER (WHERE result <> 'ok')::int AS not_ok,
                count(*) FILTER (WHERE result = 'refused')::int AS refused,
                count(statement_text)::int AS with_text
         FROM trustgate.query_log ${where} GROUP BY 1 ORDER BY 4 DESC`,
        params,
      )
    ).rows as StatementGroup[];
    const [{ n: access }] = (await this.c.query(`SELECT count(*)::int AS n FROM trustgate.access_log ${where}`, params)).rows as { n: number }[];
    return { groups, total: groups.reduce((s, g) => s + g.n, 0), access };
  }

  /** Query-log rows of one instance. */
  async queryRows(instance: string): Promise<number> {
    return ((await this.c.query('SELECT count(*)::int AS n FROM trustgate.query_log WHERE instance = $1', [instance])).rows[0] as { n: number }).n;
  }

  /** Empties both logs (the guard trigger lets TRUNCATE through under trustgate.audit_purge, like purge_audit()). */
  async purge(): Promise<void> {
    await this.c.query("BEGIN; SET LOCAL trustgate.audit_purge = 'on'; TRUNCATE trustgate.query_log, trustgate.access_log; COMMIT");
  }

  /** Backend pids of the audit writers (all gateways; only the measured one is busy). */
  async writerPids(): Promise<number[]> {
    const r = await this.c.query('SELECT pid FROM pg_stat_activity WHERE application_name = $1', [WRITER_APP]);
    return (r.rows as { pid: number }[]).map((x) => x.pid);
  }

  async close(): Promise<void> {
    await this.c.end().catch(() => undefined);
  }
}

interface StatementGroup {
  fp: string | null;
  kind: string | null;
  text: string | null;
  n: number;
  sessions: number;
  not_ok: number;
  refused: number;
  with_text: number;
}

interface DbCounts {
  groups: StatementGroup[];
  total: number;
  access: number;
}

/** utime + stime of processes, in clock ticks (a process gone counts as 0). */
function ticksOf(pids: number[]): number {
  let t = 0;
  for (const pid of pids) {
    try {
      const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      const x = st.slice(st.lastIndexOf(')') + 2).split(' ');
      t += Number(x[11]) + Number(x[12]);
    } catch {
      /* gone */
    }
  }
  return t;
}

// ------------------------------------------------------------------ gateways

interface Gateway {
  variant: Variant;
  child: GatewayChild;
  instance: string | null;
  jsonl: string | null;
  /** An admin-console connection (SHOW AUDIT). */
  admin: pg.Client;
}

function auditSection(v: Variant, tmp: string): Record<string, unknown> {
  const spool_dir = path.join(tmp, `spool-${v}`);
  switch (v) {
    case 'a':
      return { enabled: false };
    case 'b':
      return { enabled: true, instance: 'bench-b', spool_dir };
    case 'c':
      return { enabled: true, instance: 'bench-c', spool_dir, statement_text: 'fingerprint' };
    case 'd':
      return { enabled: true, instance: 'bench-d', database: false, json_lines: { path: path.join(tmp, 'audit-d.jsonl') } };
  }
}

interface AuditCounters {
  accepting: boolean;
  queued: number;
  written: number;
  spooled: number;
  dropped: number;
  rejected: number;
  failures: number;
  jsonWritten: number;
  jsonDropped: number;
  dbState: string | null;
  lastError: string | null;
}

async function showAudit(g: Gateway): Promise<AuditCounters> {
  const r = (await g.admin.query('SHOW AUDIT')).rows[0] as Record<string, string | null>;
  const n = (k: string) => Number(r[k] ?? 0);
  return {
    accepting: r.accepting !== 'false',
    queued: n('queued'),
    written: n('written'),
    spooled: n('spooled'),
    dropped: n('dropped'),
    rejected: n('rejected'),
    failures: n('failures'),
    jsonWritten: n('json_written'),
    jsonDropped: n('json_dropped'),
    dbState: r.db_state ?? null,
    lastError: r.last_error ?? null,
  };
}

/**
 * Waits until the gateway's audit output is idle: at least `atLeast` query records out (rows in the
 * query log since it was emptied; (d): JSON lines written since `before`), nothing queued, and the
 * counts still for two more polls. The query-log rows are what must arrive: SHOW AUDIT's `written`
 * also counts access records, and a batch on its way (taken from the queue, not yet committed)
 * shows in neither `queued` nor `written`. Records go out in order, so once every request's row
 * is in, so is every access record made before it.
 */
async function settleAudit(g: Gateway, adb: AuditDb, atLeast: number, before: AuditCounters): Promise<{ counters: AuditCounters; ms: number; settled: boolean }> {
  const t = Date.now();
  const deadline = t + 60_000;
  let prev: { s: AuditCounters; n: number } | null = null;
  let still = 0;
  for (;;) {
    const s = await showAudit(g);
    const n = g.instance !== null && g.variant !== 'd' ? await adb.queryRows(g.instance) : s.jsonWritten - before.jsonWritten;
    const same = prev !== null && n === prev.n && s.written === prev.s.written && s.spooled === prev.s.spooled && s.jsonWritten === prev.s.jsonWritten;
    if (same && s.queued === 0 && n >= atLeast) still++;
    else still = 0;
    if (still >= 2) return { counters: s, ms: Date.now() - t, settled: true };
    if (Date.now() > deadline) return { counters: s, ms: Date.now() - t, settled: false };
    prev = { s, n };
    await sleep(150);
  }
}

interface WriterTrace {
  /** Most records queued in memory during the run (SHOW AUDIT every 500 ms). */
  maxQueued: number;
  /** Queued when pgbench ended. */
  queuedAtEnd: number;
  /** Records the writer put into the database (or the JSON lines sink) per second while pgbench ran. */
  writtenPerSecond: number;
  /** Seconds into the run when the gateway stopped accepting requests (queue at max_queue_records), or null. */
  refusingAfterS: number | null;
  /** Growth of the queue while pgbench ran, records per second (records made − records stored). */
  backlogPerSecond: number;
  /** CPU of the writer's PostgreSQL backend while pgbench ran, % of one core. */
  backendCpuPct?: number;
}

/** Samples SHOW AUDIT every 500 ms while pgbench runs: is the writer keeping up? */
function monitorAudit(g: Gateway, before: AuditCounters): { stop(): Promise<WriterTrace> } {
  const t0 = Date.now();
  let maxQueued = 0;
  let last = before;
  let refusingAfterS: number | null = null;
  let running = true;
  const loop = (async () => {
    while (running) {
      await sleep(500);
      if (!running) break;
      try {
        const s = await showAudit(g);
        last = s;
        maxQueued = Math.max(maxQueued, s.queued);
        if (!s.accepting && refusingAfterS === null) refusingAfterS = Math.round((Date.now() - t0) / 100) / 10;
      } catch {
        /* the next sample */
      }
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      const end = await showAudit(g).catch(() => last);
      const secs = Math.max(0.001, (Date.now() - t0) / 1000);
      const out = end.written + end.spooled + end.jsonWritten - before.written - before.spooled - before.jsonWritten;
      return {
        maxQueued: Math.max(maxQueued, end.queued),
        queuedAtEnd: end.queued,
        writtenPerSecond: Math.round(out / secs),
        refusingAfterS,
        backlogPerSecond: Math.round((end.queued - before.queued) / secs),
      };
    },
  };
}

/** Lines of the JSON lines file: query records, access records, and query records of the workload's statement. */
async function countJsonLines(file: string, marker: string): Promise<{ query: number; access: number; main: number }> {
  const out = { query: 0, access: 0, main: 0 };
  if (!fs.existsSync(file)) return out;
  const rl = readline.createInterface({ input: fs.createReadStream(file, { encoding: 'utf8' }), crlfDelay: Infinity });
  for await (const line of rl) {
    if (line.startsWith('{"log":"query"')) {
      out.query++;
      if (line.includes(marker)) out.main++;
    } else if (line.startsWith('{"log":"access"')) out.access++;
  }
  return out;
}

// ------------------------------------------------------------------ cells

interface Cell {
  workload: Workload;
  variant: Variant;
}

const cellId = (c: Cell) => `${c.workload}/${c.variant}`;
/** Requests (query-log rows) per pgbench transaction. */
const REQUESTS_PER_TXN: Record<Workload, number> = { simple: 1, extended: 1, trust: 4 };
/**
 * Text of the workload's main statement (one per transaction), to find its JSON lines (pgbench's
 * own table check on its first connection also names pgbench_accounts, so the SELECT list counts).
 */
const MAIN_MARKER: Record<Workload, string> = { simple: 'SELECT abalance FROM pgbench_accounts', extended: 'SELECT abalance FROM pgbench_accounts', trust: 'FROM trust_bench.items' };

interface Measurement extends PgbenchSummary {
  id: string;
  workload: Workload;
  variant: Variant;
  round: number;
  /** When pgbench started (epoch ms). */
  startedAt: number;
  command: string;
  /** refused: the gateway refused requests (SQLSTATE 53400) because the audit queue reached max_queue_records. */
  status: 'ok' | 'failed' | 'refused';
  cpuUsPerTxn?: number;
  gatewayCpuUsPerTxn?: number;
  gatewayCpuPct?: number;
  /** CPU of the audit writer's PostgreSQL backend (the INSERTs) per transaction, µs. */
  writerBackendCpuUsPerTxn?: number;
  foreignCpuPct?: number;
  audit?: AuditCheck;
  writer?: WriterTrace;
  /** This run's requests were refused (the cell's `status` says whether any of its runs were). */
  refusedInRun?: boolean;
  /** The gateway's warnings and errors during the run (first lines). */
  gatewayLog?: string[];
  /** Runs of this cell in which requests were refused for audit overflow (medians only). */
  refusedRuns?: number;
  /** tps of every round (the measurement shown is the median run). */
  allTps?: number[];
  error?: string;
}

interface AuditCheck {
  /** Query-log rows (or JSON lines of query records) the cell produced. */
  rows: number;
  /** Rows of the workload's main statement (one per transaction). */
  mainRows: number;
  /** Client sessions those rows came from. */
  mainSessions: number | null;
  /** rows − requests per transaction × transactions: pgbench's own setup statements. */
  extraRows: number;
  extraStatements: string[];
  accessRows: number;
  rowsPerSecond: number;
  rowsWithText: number | null;
  notOk: number | null;
  /** Rows of the workload's statement with result 'refused' (audit overflow refusals are logged too). */
  mainRefused: number;
  /** Deltas of SHOW AUDIT over the cell. */
  written: number;
  spooled: number;
  dropped: number;
  rejected: number;
  failures: number;
  /** Time from the end of pgbench until the writer was idle. */
  settleMs: number;
  settled: boolean;
  /** The workload's statement rows that succeeded === transactions, and nothing dropped, spooled or rejected. */
  complete: boolean;
}

function pgbenchArgs(c: Cell, port: number, o: Options, scriptFile: string): { args: string[]; user: string; password: string } {
  const common = ['-n', '-T', String(o.duration), '-c', String(o.clients), '-j', String(Math.min(o.clients, 2))];
  if (c.workload === 'trust') return { args: [...common, '-M', 'simple', '-f', scriptFile, ...pgbenchTarget(port, TRUSTED, TRUST_DB)], user: TRUSTED, password: TRUSTED_PASSWORD };
  return { args: ['-S', ...common, '-M', c.workload, ...pgbenchTarget(port, BENCH_USER, BENCH_DB)], user: BENCH_USER, password: BENCH_PASSWORD };
}

async function measureCell(c: Cell, round: number, g: Gateway, adb: AuditDb, o: Options, scriptFile: string): Promise<Measurement> {
  const { args, password } = pgbenchArgs(c, g.child.port, o, scriptFile);
  const command = `PGPASSWORD=… pgbench ${args.join(' ')}`;
  const before = await showAudit(g);
  const writerPids = await adb.writerPids();
  const writerBefore = ticksOf(writerPids);
  const monitor = c.variant === 'a' ? null : monitorAudit(g, before);
  const startedAt = Date.now();
  const r = await runPgbench(args, password, o.duration * 1000 + 120_000, g.child.pid);
  const writerDuringRun = ticksOf(writerPids) - writerBefore;
  const runWallS = (Date.now() - startedAt) / 1000;
  const trace = await monitor?.stop();
  if (trace && c.variant !== 'd' && writerPids.length) trace.backendCpuPct = Math.round(writerDuringRun / Math.max(0.001, runWallS));
  const m: Measurement = {
    id: cellId(c),
    workload: c.workload,
    variant: c.variant,
    round,
    startedAt,
    command,
    status: 'ok',
    tps: r.tps,
    latencyMs: r.latencyMs,
    transactions: r.transactions,
    failedTransactions: r.failedTransactions,
    foreignCpuPct: r.foreignCpuPct,
  };
  if (r.treeCpuUsPerTxn !== undefined) m.cpuUsPerTxn = r.treeCpuUsPerTxn;
  if (r.poolerCpu) {
    m.gatewayCpuUsPerTxn = r.poolerCpu.usPerTxn;
    m.gatewayCpuPct = r.poolerCpu.pctOfCore;
  }
  if (trace) m.writer = trace;
  const aborted = /client \d+ aborted|aborted in command/.test(r.output);
  if (r.exit.code !== 0 || r.tps === null || aborted) {
    const refusedByAudit = /the audit log cannot take more records/.test(r.output);
    m.status = refusedByAudit && r.tps !== null ? 'refused' : 'failed';
    if (m.status === 'refused') m.refusedInRun = true;
    m.error = pgbenchFailure(r, 2, 400);
  }
  const txns = r.transactions ?? 0;
  const perTxn = REQUESTS_PER_TXN[c.workload];
  // How long pgbench ran: -T, or less when its clients were aborted (refusals).
  const runSecs = r.tps && txns ? txns / r.tps : o.duration;

  if (c.variant === 'a') {
    // Audit off: nothing may be recorded anywhere.
    const cnt = await adb.counts(null);
    if (cnt.total || cnt.access) {
      log(`warning: audit off, yet the logs hold ${cnt.total} query and ${cnt.access} access rows`);
      m.audit = emptyCheck(cnt.total, cnt.access, false);
    }
    return m;
  }

  const settle = await settleAudit(g, adb, txns * perTxn, before);
  if (!settle.settled) log(`warning: (${cellId(c)}) the audit writer was not idle ${settle.ms} ms after pgbench ended`);
  if (c.variant !== 'd' && writerPids.length && txns) m.writerBackendCpuUsPerTxn = Math.round(((((ticksOf(writerPids) - writerBefore) / 100) * 1e6) / txns) * 10) / 10;
  const after = settle.counters;
  const delta = {
    written: after.written - before.written + (after.jsonWritten - before.jsonWritten),
    spooled: after.spooled - before.spooled,
    dropped: after.dropped - before.dropped,
    rejected: after.rejected - before.rejected,
    failures: after.failures - before.failures,
  };
  let check: AuditCheck;
  if (c.variant === 'd') {
    const lines = await countJsonLines(g.jsonl!, MAIN_MARKER[c.workload]);
    fs.truncateSync(g.jsonl!, 0); // appended with O_APPEND: the sink keeps writing at the (new) end
    check = {
      rows: lines.query,
      mainRows: lines.main,
      mainSessions: null,
      extraRows: lines.query - perTxn * txns,
      extraStatements: [],
      accessRows: lines.access,
      rowsPerSecond: Math.round(lines.query / runSecs),
      rowsWithText: null,
      notOk: null,
      mainRefused: 0,
      ...delta,
      settleMs: settle.ms,
      settled: settle.settled,
      complete: false,
    };
  } else {
    const cnt = await adb.counts(g.instance);
    await adb.purge();
    const main = cnt.groups.filter((x) => x.kind === 'SELECT').sort((x, y) => y.n - x.n)[0];
    // pgbench's own statements run once; (statements that do not parse, such as SET QUERY_BAND, get a
    // fingerprint per text, so the trust workload has many small groups that are not extra).
    const extraGroups = cnt.groups.filter((x) => x.n <= 3);
    check = {
      rows: cnt.total,
      mainRows: main?.n ?? 0,
      mainSessions: main?.sessions ?? 0,
      extraRows: cnt.total - perTxn * txns,
      extraStatements: extraGroups.map((x) => `${x.n}× ${x.kind ?? '?'}${x.text ? `: ${x.text}` : ''}`).slice(0, 6),
      accessRows: cnt.access,
      rowsPerSecond: Math.round(cnt.total / runSecs),
      rowsWithText: cnt.groups.reduce((s, x) => s + x.with_text, 0),
      notOk: cnt.groups.reduce((s, x) => s + x.not_ok, 0),
      mainRefused: main?.refused ?? 0,
      ...delta,
      settleMs: settle.ms,
      settled: settle.settled,
      complete: false,
    };
  }
  // A run cut short by refusals: pgbench does not count the transactions its aborted clients were in
  // the middle of, but their requests that did run are logged (at most one SELECT per client).
  const mainOk = check.mainRows - check.mainRefused;
  const inFlight = m.status === 'refused' ? o.clients : 0;
  check.complete = txns > 0 && mainOk >= txns && mainOk <= txns + inFlight && check.dropped === 0 && check.spooled === 0 && check.rejected === 0 && check.extraRows >= 0;
  m.audit = check;
  return m;
}

function emptyCheck(rows: number, access: number, complete: boolean): AuditCheck {
  return { rows, mainRows: 0, mainSessions: null, extraRows: rows, extraStatements: [], accessRows: access, rowsPerSecond: 0, rowsWithText: null, notOk: null, mainRefused: 0, written: 0, spooled: 0, dropped: 0, rejected: 0, failures: 0, settleMs: 0, settled: true, complete };
}

// ------------------------------------------------------------------ report

const fmtRatio = (n: number | null) => (n === null ? '–' : `${n.toFixed(2)}×`);
const ratio = (x: number | null | undefined, y: number | null | undefined) => (x && y ? x / y : null);
const median = (xs: number[]) => {
  const s = [...xs].sort((p, q) => p - q);
  return s.length ? (s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2) : null;
};

interface Target {
  name: string;
  measured: number | null;
  /** Median of the per-round ratios (each round's cells ran back to back). */
  perRoundMedian: number | null;
  /** The same from CPU per transaction of all processes, off / on (less sensitive to other jobs on the box). */
  byCpu: number | null;
  target: number;
  met: boolean | null;
  /** Counts towards the headline verdict (the default configuration). */
  headline: boolean;
  /** Runs in which the gateway refused requests because the audit queue was full. */
  refusedRuns: number;
  runs: number;
}

function rowsCheckText(m: Measurement): string {
  if (m.variant === 'a') return m.audit ? `**${fmtInt(m.audit.rows)} rows with audit off**` : 'off (0 rows)';
  const a = m.audit;
  if (!a) return '–';
  const what = m.variant === 'd' ? 'lines' : 'rows';
  const extra = a.extraRows === 0 ? '' : m.refusedInRun ? ` (+${fmtInt(a.extraRows)} other: pgbench setup, refused requests, transactions cut short)` : ` (${a.extraRows > 0 ? '+' : ''}${fmtInt(a.extraRows)} setup)`;
  const perTxn = REQUESTS_PER_TXN[m.workload];
  const head = a.complete ? '✓' : '**✗**';
  const losses = [a.dropped && `${a.dropped} dropped`, a.spooled && `${a.spooled} spooled`, a.rejected && `${a.rejected} rejected`, a.mainRefused && `${a.mainRefused} refused requests logged as refused`]
    .filter(Boolean)
    .join(', ');
  const inFlight = a.mainRows - a.mainRefused - (m.transactions ?? 0);
  const cut = inFlight > 0 ? `; ${inFlight} transactions cut short by the refusals (not counted by pgbench) logged as far as they ran` : '';
  return `${head} ${fmtInt(a.rows)} ${what} = ${perTxn > 1 ? `${perTxn} × ` : ''}${fmtInt(m.transactions)} txns${extra}${losses ? `; ${losses}` : ''}${cut}`;
}

function resultTable(cells: Cell[], results: Map<string, Measurement>): string {
  const rows = [
    '| workload | audit | tps (median) | vs off | latency ms | trustgate CPU µs/txn | all processes CPU µs/txn | writer backend CPU µs/txn | log rows/s | log rows vs pgbench transactions | tps per round | other CPU % of a core |',
    '| :-- | :-- | --: | --: | --: | --: | --: | --: | --: | :-- | :-- | --: |',
  ];
  for (const c of cells) {
    const m = results.get(cellId(c));
    if (!m) continue;
    const label = `(${c.variant}) ${VARIANT_TITLE[c.variant]}`;
    if (m.status === 'failed') {
      rows.push(`| ${c.workload} | ${label} | failed | – | – | – | – | – | – | ${m.error?.replace(/\|/g, '/').slice(0, 120) ?? ''} | – | – |`);
      continue;
    }
    const off = results.get(cellId({ workload: c.workload, variant: 'a' }));
    const vsOff = c.variant === 'a' ? '1.00×' : fmtRatio(ratio(m.tps, off?.status === 'ok' ? off.tps : null));
    const refused = m.refusedRuns ? ` ⚠ refused in ${m.refusedRuns}/${m.allTps?.length ?? 1}` : '';
    rows.push(
      `| ${c.workload} | ${label} | ${fmtInt(m.tps)}${refused} | ${vsOff} | ${m.latencyMs?.toFixed(2) ?? '–'} | ${m.gatewayCpuUsPerTxn ?? '–'} | ${m.cpuUsPerTxn ?? '–'} | ${m.writerBackendCpuUsPerTxn ?? '–'} | ${m.audit && c.variant !== 'a' ? fmtInt(m.audit.rowsPerSecond) : '–'} | ${rowsCheckText(m)} | ${(m.allTps ?? []).map((x) => fmtInt(x)).join(', ')} | ${m.foreignCpuPct ?? '–'} |`,
    );
  }
  return rows.join('\n');
}

/** Queue growth per second; below 1 % of what was made it counts as keeping up. */
const backlog = (perS: number, made: number | null) => (perS <= Math.max(50, (made ?? 0) / 100) ? '≈ 0' : `+${fmtInt(perS)} (${Math.round(100_000 / perS)} s)`);

function writerTable(cells: Cell[], results: Map<string, Measurement>, runs: Map<string, Measurement[]>): string {
  const rows = [
    '| workload | audit | log records made/s | stored/s while pgbench ran (its wall time, with connection setup) | writer backend CPU while pgbench ran, % of a core | queue growth/s (→ 100,000 queued after) | worst run: queue growth/s | most queued, any run | idle after pgbench, ms | writer backend CPU µs/row | requests refused (queue at max_queue_records) |',
    '| :-- | :-- | --: | --: | --: | --: | --: | --: | --: | --: | :-- |',
  ];
  for (const c of cells) {
    if (c.variant === 'a') continue;
    const m = results.get(cellId(c));
    if (!m || m.status === 'failed' || !m.audit || !m.writer) continue;
    const all = runs.get(cellId(c)) ?? [];
    const refused = all.filter((x) => x.status === 'refused');
    const perRow = m.writerBackendCpuUsPerTxn === undefined ? '–' : (m.writerBackendCpuUsPerTxn / REQUESTS_PER_TXN[c.workload]).toFixed(1);
    // Records made: query rows plus access rows (the trust workload's proxy_granted decisions),
    // over the time pgbench ran (transactions / tps; shorter than -T when requests were refused).
    const secs = m.transactions && m.tps ? m.transactions / m.tps : null;
    const made = secs ? (m.audit.rows + m.audit.accessRows) / secs : null;
    rows.push(
      `| ${c.workload} | (${c.variant}) | ${fmtInt(made)} | ${fmtInt(m.writer.writtenPerSecond)} | ${m.writer.backendCpuPct ?? '–'} | ${c.variant === 'd' ? '–' : backlog(m.writer.backlogPerSecond, made)} | ${
        c.variant === 'd' ? '–' : backlog(Math.max(...all.map((x) => x.writer?.backlogPerSecond ?? 0)), made)
      } | ${c.variant === 'd' ? '–' : fmtInt(Math.max(...all.map((x) => x.writer?.maxQueued ?? 0)))} | ${fmtInt(m.audit.settleMs)} | ${perRow} | ${
        refused.length ? `**yes, in ${refused.length}/${all.length} runs** (after ${refused.map((x) => `${x.writer?.refusingAfterS ?? '?'} s`).join(', ')})` : 'no'
      } |`,
    );
  }
  return rows.join('\n');
}

function targets(cells: Cell[], results: Map<string, Measurement>, runs: Map<string, Measurement[]>): Target[] {
  const out: Target[] = [];
  for (const c of cells) {
    if (c.variant === 'a') continue;
    const offId = cellId({ workload: c.workload, variant: 'a' });
    const on = results.get(cellId(c));
    const off = results.get(offId);
    if (!off) continue;
    const measured = on && on.status !== 'failed' && off.status === 'ok' ? ratio(on.tps, off.tps) : null;
    const refusedRuns = on?.refusedRuns ?? 0;
    const onRuns = runs.get(cellId(c)) ?? [];
    const offRuns = runs.get(offId) ?? [];
    const perRound = onRuns.map((x) => ratio(x.tps, offRuns.find((y) => y.round === x.round)?.tps)).filter((x): x is number => x !== null);
    out.push({
      name: `(${c.variant})/(a) ${WORKLOAD_TITLE[c.workload]}: ${VARIANT_TITLE[c.variant]} vs off`,
      measured,
      perRoundMedian: median(perRound),
      byCpu: on && on.status !== 'failed' && off.status === 'ok' ? ratio(off.cpuUsPerTxn, on.cpuUsPerTxn) : null,
      target: 0.9,
      // Throughput that makes the gateway refuse requests is not sustained, whatever its ratio.
      met: measured === null ? null : measured >= 0.9 && refusedRuns === 0,
      refusedRuns,
      runs: onRuns.length,
      headline: c.variant === 'b',
    });
  }
  return out;
}

function verdictLine(ts: Target[]): string {
  const head = ts.filter((t) => t.headline);
  if (!head.length || head.some((t) => t.met === null)) return '≥ 0.9×: not measured';
  const missed = head.filter((t) => !t.met);
  const why = (t: Target) => `${t.name.split(':')[0]} ${fmtRatio(t.measured)}${t.refusedRuns ? ` with refusals in ${t.refusedRuns}/${t.runs} runs` : ''}`;
  return missed.length ? `≥ 0.9×: **not met** (${missed.map(why).join('; ')})` : '≥ 0.9×: **met**';
}

function targetLines(ts: Target[]): string[] {
  return ts.map((t) => {
    const v = t.met === null ? 'not measured' : t.met ? 'MET' : 'NOT MET';
    const refused = t.refusedRuns ? `; **requests refused (audit queue full) in ${t.refusedRuns} of ${t.runs} runs**, so the ratio is of the throughput before the refusals, not a sustained one` : '';
    return `- ${t.name}: ${fmtRatio(t.measured)}${refused} (median of the per-round ratios ${fmtRatio(t.perRoundMedian)}, from CPU per transaction of all processes ${fmtRatio(t.byCpu)}; target ≥ ${t.target}×) — **${v}**${t.headline ? '' : ' (informative: not the default configuration)'}`;
  });
}

// ------------------------------------------------------------------ main

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  const cells: Cell[] = [];
  for (const w of WORKLOADS) {
    if (!opts.workloads.includes(w)) continue;
    for (const v of VARIANTS) if (opts.variants.includes(v) && (w !== 'trust' || TRUST_VARIANTS.includes(v))) cells.push({ workload: w, variant: v });
  }
  if (!cells.length) throw new Error('no cells: check --variants and --workloads');
  const variants = VARIANTS.filter((v) => cells.some((c) => c.variant === v));
  const wantTrust = cells.some((c) => c.workload === 'trust');
  armWatchdog((opts.rounds * cells.length * (opts.duration + 60) + variants.length * 2 * (opts.warmup + 30) + 600) * 1000);

  requireTools(['pgbench']);
  const tmp = makeTempDir('trustgate-bench-audit-');
  const launch = await prepareLauncher(opts, tmp);

  const db = await startPostgres();
  log(`PostgreSQL pid ${db.pid} on port ${db.port}`);
  await db.query(`CREATE ROLE ${BENCH_USER} LOGIN PASSWORD '${BENCH_PASSWORD}'`);
  await db.query(`CREATE DATABASE ${BENCH_DB} OWNER ${BENCH_USER}`);
  await installAuthQuery(db); // the auth function, the trusted-sessions catalog and the audit schema, in postgres
  const [{ server_version: pgVersion }] = await db.query<{ server_version: string }>('SHOW server_version');
  log(`pgbench -i -s ${opts.scale}`);
  const init = await run('pgbench', ['-i', '-q', '-s', String(opts.scale), ...pgbenchTarget(db.port, BENCH_USER, BENCH_DB)], { env: pgbenchEnv(BENCH_PASSWORD), timeoutMs: 900_000 });
  if (init.code !== 0) throw new Error(`pgbench -i failed:\n${init.stderr.slice(-2000)}`);
  if (wantTrust) await setupTrust(db, opts.users);
  const adb = await AuditDb.open(db);

  const gateways = new Map<Variant, Gateway>();
  try {
    for (const v of variants) {
      const audit = auditSection(v, tmp);
      const config = { ...gatewayConfig(db, opts.poolSize, opts.logLevel), admin_users: [BENCH_USER], audit };
      const child = await startGatewayChild(launch, config);
      const admin = new pg.Client(clientConfig(child.port, BENCH_USER, BENCH_PASSWORD, 'trustgate'));
      admin.on('error', (err) => log(`admin console (${v}): ${err.message}`));
      await admin.connect();
      const g: Gateway = { variant: v, child, instance: (audit.instance as string | undefined) ?? null, jsonl: v === 'd' ? path.join(tmp, 'audit-d.jsonl') : null, admin };
      gateways.set(v, g);
      log(`(${v}) ${VARIANT_TITLE[v]}: trustgate child pid ${child.pid} on port ${child.port} (${launchKind(launch)}), transaction mode, pool ${opts.poolSize}`);
    }
    if (wantTrust) {
      const t = Date.now();
      await grantConnectThrough(gateways.get(variants[0])!.child.port, opts.users);
      for (const v of variants) if (TRUST_VARIANTS.includes(v)) await trustSanityCheck(gateways.get(v)!.child.port, opts.users, v);
      log(`GRANT CONNECT THROUGH ${TRUSTED} TO PERMANENT pu_1 … pu_${opts.users} WITHOUT ROLE; a proxied request works through ${TRUST_VARIANTS.filter((v) => variants.includes(v)).join(', ')} (${((Date.now() - t) / 1000).toFixed(1)} s)`);
    }

    const scriptFile = path.join(tmp, 'trust.sql');
    fs.writeFileSync(
      scriptFile,
      `\\set id random(1, ${ITEMS})\n\\set p random(1, ${opts.users})\nBEGIN;\nSET QUERY_BAND = 'ProxyUser=pu_:p;' FOR TRANSACTION;\nSELECT name FROM trust_bench.items WHERE id = :id;\nCOMMIT;\n`,
    );

    // Warm-up: every gateway with every workload it will see (JIT, full pools, the parser loaded).
    if (opts.warmup > 0) {
      for (const v of variants) {
        const g = gateways.get(v)!;
        const before = await showAudit(g);
        let rows = 0;
        for (const w of opts.workloads) {
          if (!cells.some((c) => c.workload === w && c.variant === v)) continue;
          const { args, password } = pgbenchArgs({ workload: w, variant: v }, g.child.port, { ...opts, duration: opts.warmup }, scriptFile);
          const r = await runPgbench(args, password, opts.warmup * 1000 + 120_000);
          log(`warm-up (${v}) ${w}: ${r.tps === null ? `FAILED ${pgbenchFailure(r, 3, 400)}` : `${fmtInt(r.tps)} tps`}`);
          rows += (r.transactions ?? 0) * REQUESTS_PER_TXN[w];
        }
        // Wait for the warm-up's records before the next gateway (and the purge) starts.
        if (v !== 'a') {
          const st = await settleAudit(g, adb, rows, before);
          if (!st.settled) log(`warning: (${v}) the audit writer was not idle ${st.ms} ms after the warm-up`);
        }
        g.child.takeLines();
      }
    }
    // Start from empty logs (the warm-up's records, the sanity checks' requests): the last records
    // reach the database within a flush interval (100 ms) of being made; wait well past that.
    await sleep(1000);
    for (const g of gateways.values()) if (g.variant !== 'a') await settleAudit(g, adb, 0, await showAudit(g));
    await adb.purge();
    const jl = gateways.get('d')?.jsonl;
    if (jl && fs.existsSync(jl)) fs.truncateSync(jl, 0);

    // Interleaved: round after round, each workload's variants back to back; the order of the
    // variants rotates every round so none always runs first (or right after another's writes).
    const runs = new Map<string, Measurement[]>(cells.map((c) => [cellId(c), []]));
    const total = cells.length * opts.rounds;
    let i = 0;
    for (let round = 1; round <= opts.rounds; round++) {
      for (const w of WORKLOADS) {
        const ws = cells.filter((c) => c.workload === w);
        const k = (round - 1) % Math.max(1, ws.length);
        for (const c of [...ws.slice(k), ...ws.slice(0, k)]) {
          if (wasInterrupted()) throw new Error('interrupted');
          i++;
          const g = gateways.get(c.variant)!;
          const m = await measureCell(c, round, g, adb, opts, scriptFile);
          runs.get(cellId(c))!.push(m);
          const a = m.audit;
          log(
            `[${i}/${total}] round ${round} ${c.workload.padEnd(8)} (${c.variant}) ` +
              (m.status === 'failed' ? `FAILED: ${m.error}` : `${fmtInt(m.tps).padStart(7)} tps  ${m.latencyMs?.toFixed(2)} ms`) +
              (m.status === 'refused' ? ` — REFUSED by the gateway (audit queue full): ${m.error}` : '') +
              (m.gatewayCpuUsPerTxn !== undefined ? `  trustgate ${m.gatewayCpuUsPerTxn} µs/txn (${m.gatewayCpuPct}% of a core)` : '') +
              (m.writerBackendCpuUsPerTxn !== undefined ? `, writer backend ${m.writerBackendCpuUsPerTxn} µs/txn` : '') +
              (a && c.variant !== 'a' ? `; log ${fmtInt(a.rows)} rows (main ${fmtInt(a.mainRows)} vs ${fmtInt(m.transactions)} txns, extra ${a.extraRows}, access ${fmtInt(a.accessRows)}), idle after ${a.settleMs} ms${a.complete ? '' : ' — INCOMPLETE'}` : '') +
              (m.writer ? `; writer ${fmtInt(m.writer.writtenPerSecond)} rows/s (backend ${m.writer.backendCpuPct ?? '–'}% of a core), backlog +${fmtInt(m.writer.backlogPerSecond)}/s, max queued ${fmtInt(m.writer.maxQueued)}, at end ${fmtInt(m.writer.queuedAtEnd)}` : '') +
              (m.foreignCpuPct !== undefined && m.foreignCpuPct >= 10 ? `  [other processes used ${m.foreignCpuPct}% of a core]` : ''),
          );
          if (a && !a.complete && c.variant !== 'a') log(`  check (${cellId(c)}): ${JSON.stringify(a)}`);
          const lines = g.child.takeLines();
          if (lines.length) m.gatewayLog = lines.slice(0, 4).map((l) => l.slice(0, 400));
          if (m.writer && m.writer.refusingAfterS === null) {
            // The refusal window can fall between two SHOW AUDIT samples: the gateway's log line has the time.
            const full = lines.map((l) => /"time":"([^"]+)".*audit queue full/.exec(l)).find(Boolean);
            if (full) m.writer.refusingAfterS = Math.round((Date.parse(full[1]) - m.startedAt) / 100) / 10;
          }
          if (lines.length) log(`trustgate (${c.variant}) wrote ${lines.length} log lines; first: ${lines[0].slice(0, 300)}`);
          if (exited(g.child.cp)) throw new Error(`trustgate child (${c.variant}) died:\n${g.child.tail()}`);
        }
      }
    }

    const results = new Map<string, Measurement>();
    for (const [id, list] of runs) {
      const failed = list.find((m) => m.status === 'failed');
      if (failed) {
        results.set(id, { ...failed, allTps: list.map((m) => m.tps ?? 0) });
        continue;
      }
      // Runs with audit refusals keep their tps (the rate before the refusals) and mark the cell.
      const refusedRuns = list.filter((m) => m.status === 'refused').length;
      const sorted = [...list].sort((x, y) => (x.tps ?? 0) - (y.tps ?? 0));
      const med = sorted[Math.floor((sorted.length - 1) / 2)];
      results.set(id, { ...med, status: refusedRuns ? 'refused' : 'ok', ...(refusedRuns ? { refusedRuns } : {}), allTps: list.map((m) => m.tps ?? 0) });
    }

    // ---------------------------------------------------------------- report
    const ts = targets(cells, results, runs);
    const verdict = verdictLine(ts);
    const allRuns = [...runs.values()].flat();
    const incomplete = allRuns.filter((m) => m.variant !== 'a' && m.audit && !m.audit.complete);
    const offLogged = allRuns.filter((m) => m.variant === 'a' && m.audit);
    const noise = Math.max(0, ...allRuns.map((m) => m.foreignCpuPct ?? 0));
    const maxSettle = Math.max(0, ...allRuns.map((m) => (m.variant !== 'a' && m.audit ? m.audit.settleMs : 0)));
    const date = new Date().toISOString();
    const machine = describeMachine(pgVersion);
    const runtimeS = Math.round((Date.now() - started) / 1000);
    const settings = {
      duration: opts.duration,
      clients: opts.clients,
      pgbenchThreads: Math.min(opts.clients, 2),
      rounds: opts.rounds,
      warmup: opts.warmup,
      scale: opts.scale,
      proxyUsers: wantTrust ? opts.users : undefined,
      poolSize: opts.poolSize,
      poolMode: 'transaction',
      postgres: { ...POSTGRES_SETTINGS, note: 'embedded: fsync, synchronous_commit and full_page_writes off' },
      trustgate: `one separate process per variant, all running (${launchKind(launch)}), log level ${opts.logLevel}, auth scram-sha-256 via auth query`,
      gatewayModule: launch.gatewayModule ? path.relative(ROOT, fileURLToPath(launch.gatewayModule)) : 'src/ via tsx',
      code: process.env.TRUSTGATE_BENCH_GATEWAY_MODULE ? { note: 'TRUSTGATE_BENCH_GATEWAY_MODULE: another build' } : gitState(),
      audit: Object.fromEntries(variants.map((v) => [v, { title: VARIANT_TITLE[v], config: auditSection(v, '<tmp>') }])),
      trustScript: wantTrust ? fs.readFileSync(scriptFile, 'utf8') : undefined,
    };
    const table = resultTable(cells, results);
    const wtable = writerTable(cells, results, runs);
    const refusedAll = allRuns.filter((m) => m.status === 'refused');
    const commandLine = `npm run bench:audit${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}`;
    fs.mkdirSync(opts.out, { recursive: true });
    fs.writeFileSync(
      path.join(opts.out, 'audit-latest.json'),
      `${JSON.stringify({ date, command: commandLine, runtimeSeconds: runtimeS, machine, settings, cells: cells.map((c) => results.get(cellId(c))), runs: allRuns, targets: ts, verdict: verdict.replace(/\*\*/g, '') }, null, 2)}\n`,
    );
    const code = settings.code;
    const md = [
      '# trustgate benchmark: query log overhead (audit on vs off)',
      '',
      `- date: ${date}; command: \`${commandLine}\`; runtime ${Math.floor(runtimeS / 60)} min ${runtimeS % 60} s`,
      `- machine: ${machine.cores} cores (${machine.cpu}), ${machine.memoryGiB} GiB, ${machine.kernel}; node ${machine.node}; PostgreSQL ${machine.postgres} (embedded, fsync/synchronous_commit/full_page_writes off); ${machine.pgbench}`,
      `- code: ${'commit' in code ? `commit ${code.commit}${code.dirtySrc.length ? ` plus uncommitted changes in ${code.dirtySrc.join(', ')}` : ''}` : code.note}; gateway module ${settings.gatewayModule}`,
      `- one trustgate process per variant, all running, each idle while another is measured; transaction mode, pool ${opts.poolSize}; clients authenticate with SCRAM-SHA-256; 127.0.0.1 TCP; pgbench, trustgate and PostgreSQL share the same cores`,
      `- every cell: ${opts.clients} clients, -j ${settings.pgbenchThreads}, ${opts.duration} s, after ${opts.warmup} s unrecorded warm-up per gateway and workload; ${opts.rounds} interleaved round${opts.rounds > 1 ? 's (variant order rotated each round), each cell\'s median-tps run shown' : ''}`,
      `- audit variants: ${variants.map((v) => `(${v}) ${VARIANT_TITLE[v]}`).join('; ')}. The database writer inserts as the auth role into trustgate.query_log/access_log in the audit database (postgres); batches of 1000 or every 100 ms`,
      wantTrust ? `- trust: BEGIN; SET QUERY_BAND = 'ProxyUser=pu_<random of ${opts.users}>;' FOR TRANSACTION; SELECT one row; COMMIT as ${TRUSTED} (bench/trust.ts (b)): 4 requests, so 4 query-log rows, and (nearly always) one proxy_granted access-log row per transaction` : '',
      '- trustgate CPU: utime+stime of the gateway process during the pgbench run per transaction; all processes: pgbench, trustgate, PostgreSQL; writer backend: the PostgreSQL backend of the audit writer (application_name "trustgate audit"), including the flush after pgbench ended',
      '- log rows vs pgbench transactions: after each cell the benchmark waits until SHOW AUDIT shows nothing queued, counts trustgate.query_log (as the superuser; (d): the lines of the JSON lines file), then empties the logs (TRUNCATE under the purge guard setting) so table growth does not skew later cells. ✓ = the rows of the workload\'s SELECT equal the transactions pgbench reports and nothing was dropped, spooled or rejected; "setup" = pgbench\'s own statements on its first connection (table checks)',
      `- noise: CPU used by processes outside the benchmark during a cell was at most ${noise}% of one core${noise >= 10 ? ' — other jobs shared this box, so tps and ratios are less reliable (last column)' : ''}`,
      '',
      table,
      '',
      '## The audit writer: does it keep up?',
      '',
      'Per cell (its median run): audit records made per second (query-log rows, plus access-log rows in trust), what the writer stored per second while pgbench ran (SHOW AUDIT `written`, polled every 500 ms; (d): JSON lines written) and the CPU its PostgreSQL backend got meanwhile, how fast the in-memory queue grew (and when, at that rate, it would reach the default max_queue_records of 100,000), the most records queued, how long the writer took to be idle after pgbench ended, and the CPU of its PostgreSQL backend per query-log row over the whole cell. At `max_queue_records` (default 100,000) queued, the default `on_overflow: refuse` makes the gateway refuse new requests (SQLSTATE 53400) until the queue is below 90 %.',
      '',
      wtable,
      '',
      ...(() => {
        const worst = allRuns.filter((m) => m.writer && m.variant !== 'd').sort((x, y) => (y.writer?.maxQueued ?? 0) - (x.writer?.maxQueued ?? 0))[0];
        return worst && !refusedAll.length
          ? [`No run reached max_queue_records; the closest: ${fmtInt(worst.writer!.maxQueued)} records queued in ${worst.id} round ${worst.round} (growing ${fmtInt(worst.writer!.backlogPerSecond)}/s when pgbench ended). A cell a few seconds longer, or a busier box, makes the gateway refuse requests (SQLSTATE 53400).`, '']
          : [];
      })(),
      ...(refusedAll.length
        ? [
            `**Refusals:** in ${refusedAll.length} of ${allRuns.filter((m) => m.variant !== 'a').length} audit-on runs the gateway refused requests because its audit queue reached max_queue_records while the database was up (SHOW AUDIT: failures ${refusedAll.reduce((x, m) => x + (m.audit?.failures ?? 0), 0)}, spooled ${refusedAll.reduce((x, m) => x + (m.audit?.spooled ?? 0), 0)}, dropped ${refusedAll.reduce((x, m) => x + (m.audit?.dropped ?? 0), 0)}): the writer inserts fewer rows per second than the clients make, one batch at a time, and the backlog grows until the limit. pgbench's clients were aborted by the first refusal; their tps is the rate until then. The gateway logged: \`${(refusedAll.find((m) => m.gatewayLog?.length)?.gatewayLog ?? ['–'])[0]}\``,
            '',
          ]
        : []),
      '## Targets (issue 4: query logging on vs off, ≥ 0.9× throughput)',
      '',
      ...targetLines(ts),
      '',
      `**${verdict.replace(/\*\*/g, '')}** (headline: the default configuration (b) in every workload measured)`,
      '',
      '## Nothing dropped',
      '',
      incomplete.length === 0 && offLogged.length === 0
        ? `Every run of every audit-on cell (${allRuns.filter((m) => m.variant !== 'a').length} runs): the log held exactly one successful row of the workload's SELECT per pgbench transaction (in runs cut short by refusals: plus at most one per client for the transaction it was aborted in; the refused requests are logged as well, with result 'refused'), no record was dropped, spooled or rejected (SHOW AUDIT deltas), and audit off wrote nothing.`
        : [...incomplete.map((m) => `- **${m.id} round ${m.round}**: ${rowsCheckText(m)} — ${JSON.stringify(m.audit)}`), ...offLogged.map((m) => `- **${m.id} round ${m.round}**: audit off, yet ${m.audit!.rows} query-log rows`)].join('\n'),
      '',
    ];
    const extrasAll = [...new Set(allRuns.flatMap((m) => m.audit?.extraStatements ?? []).map((s) => s.replace(/^\d+× /, '')))];
    // (c) stores no text: its bare kinds are the same statements as the ones with text.
    const extras = extrasAll.filter((s) => s.includes(':') || !extrasAll.some((t) => t.startsWith(`${s}:`)));
    md.push(`After pgbench ended, the audit output was idle (nothing queued, counters still for two polls 150 ms apart) within at most ${fmtInt(maxSettle)} ms: the backlog the writer had left to drain, included in the writer backend CPU column.`, '');
    if (extras.length) md.push(`Setup statements seen besides the workload: ${extras.map((s) => `\`${s}\``).join(', ')}.`, '');
    md.push('## pgbench commands', '', ...cells.map((c) => `- ${cellId(c)}: \`${results.get(cellId(c))?.command ?? ''}\``), '');
    if (wantTrust) md.push('trust script:', '', '```', settings.trustScript!.trimEnd(), '```', '');
    const failures = [...results.values()].filter((m) => m.status === 'failed');
    if (failures.length) md.push('## Failures', '', ...failures.map((m) => `- ${m.id}: ${m.error}`), '');
    fs.writeFileSync(path.join(opts.out, 'audit-latest.md'), md.filter((l, k) => l !== '' || md[k - 1] !== '').join('\n'));

    console.log(`\n${table}\n`);
    console.log(`${wtable}\n`);
    console.log(targetLines(ts).join('\n').replace(/\*\*/g, ''));
    console.log(`\n${verdict.replace(/\*\*/g, '')}`);
    console.log(incomplete.length || offLogged.length ? `\nINCOMPLETE audit in ${incomplete.length + offLogged.length} run(s): see the report` : '\nnothing dropped: every transaction has its query-log row in every audit-on run');
    console.log(`\nresults: ${path.relative(process.cwd(), path.join(opts.out, 'audit-latest.md'))}, audit-latest.json (runtime ${runtimeS} s)`);
    if (failures.length) throw new Error(`${failures.length} cell(s) failed: ${failures.map((m) => m.id).join(', ')}`);
  } finally {
    for (const g of gateways.values()) {
      await g.admin.end().catch(() => undefined);
      await g.child.stop();
    }
    await adb.close();
  }
}

runBenchmark(main);
