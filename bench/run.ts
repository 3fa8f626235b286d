/**
 * trustgate benchmark: pgbench -S against PostgreSQL directly, through trustgate (transaction
 * mode, in its own process) and through PgBouncer (transaction mode), all against ONE embedded
 * PostgreSQL in ONE run; plus the memory cost of idle client connections.
 *
 *   npm run bench                                   # defaults: 10 s × 27 cells + memory
 *   npm run bench -- --duration 5 --clients 1,32 --protocols simple --skip-memory
 *   npm run bench -- --profile                      # also CPU-profile trustgate (32 clients, simple)
 *
 * Writes bench/results/latest.{json,md,svg}. Needs pgbench/psql (PostgreSQL client tools); installs
 * PgBouncer with apt-get when missing (root only). Every wait is bounded; all processes and temp
 * dirs are cleaned up at the end, on error and on SIGINT/SIGTERM.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { findFreePort, type EmbeddedPostgres } from '../src/embedded/postgres.js';
import { ServerConnection } from '../src/server/server-connection.js';
import { parseScramVerifier, scramKeysForPassword } from '../src/auth/scram.js';
import { createLogger } from '../src/log/logger.js';
import { summarizeProfile, formatProfileSummary } from './profile.js';
import {
  ROOT, log, fmtInt, commandLineFlags, runBenchmark, armWatchdog, requireTools, makeTempDir, versionOf, describeMachine,
  run, sleep, exited, killChild, tailKeeper, spawnWithMaxOpenFiles,
  POSTGRES_SETTINGS, startPostgres, installAuthQuery,
  prepareLauncher, launchKind, startGatewayChild, gatewayConfig, type GatewayChild, type ListeningChild, type SharedOptions,
  runPgbench, pgbenchTarget, pgbenchEnv, pgbenchFailure, type PgbenchSummary,
  waitForPort,
} from './common.js';

// ------------------------------------------------------------------ options

const TARGETS = ['direct', 'trustgate', 'pgbouncer'] as const;
type Target = (typeof TARGETS)[number];
const PROTOCOLS = ['simple', 'extended', 'prepared'] as const;
type Protocol = (typeof PROTOCOLS)[number];

interface Options extends SharedOptions {
  duration: number;
  clients: number[];
  protocols: Protocol[];
  targets: Target[];
  poolSize: number;
  scale: number;
  skipMemory: boolean;
  memoryClients: number[];
  profile: boolean;
  profileClients: number;
  profileProtocol: Protocol;
  warmup: number;
}

const USAGE = `usage: npm run bench -- [options]
  --duration <s>            seconds per pgbench cell (default 10)
  --clients <list>          client counts (default 1,32,256)
  --protocols <list>        simple,extended,prepared (default all)
  --targets <list>          direct,trustgate,pgbouncer (default all)
  --pool-size <n>           server connections per pool for both poolers (default 20)
  --scale <n>               pgbench -i scale factor (default 10)
  --warmup <s>              unrecorded warm-up run per target (default 3, 0 = none)
  --skip-memory             skip the idle-client memory measurement
  --memory-clients <list>   idle client counts (default 1000,10000)
  --profile                 CPU-profile a trustgate run (see --profile-clients/--profile-protocol)
  --profile-clients <n>     (default 32)
  --profile-protocol <p>    (default simple)
  --no-build                do not run tsc -p tsconfig.build.json first (uses dist/ if present)
  --out <dir>               results directory (default bench/results)`;

function parseOptions(argv: string[]): Options {
  const o: Options = {
    duration: 10,
    clients: [1, 32, 256],
    protocols: [...PROTOCOLS],
    targets: [...TARGETS],
    poolSize: 20,
    scale: 10,
    skipMemory: false,
    memoryClients: [1000, 10000],
    profile: false,
    profileClients: 32,
    profileProtocol: 'simple',
    warmup: 3,
    build: true,
    out: path.join(ROOT, 'bench', 'results'),
  };
  const ints = (v: string, flag: string) =>
    v.split(',').map((s) => {
      const n = Number(s.trim());
      if (!Number.isInteger(n) || n < 1) throw new Error(`${flag}: "${s}" is not a positive integer`);
      return n;
    });
  const oneOf = <T extends string>(v: string, allowed: readonly T[], flag: string): T[] =>
    v.split(',').map((s) => {
      const x = s.trim() as T;
      if (!allowed.includes(x)) throw new Error(`${flag}: "${s}" is not one of ${allowed.join(', ')}`);
      return x;
    });
  for (const { flag, value, unknown } of commandLineFlags(argv, USAGE, o)) {
    switch (flag) {
      case '--duration':
        o.duration = ints(value(), flag)[0];
        break;
      case '--clients':
        o.clients = ints(value(), flag);
        break;
      case '--protocols':
        o.protocols = oneOf(value(), PROTOCOLS, flag);
        break;
      case '--targets':
        o.targets = oneOf(value(), TARGETS, flag);
        break;
      case '--pool-size':
        o.poolSize = ints(value(), flag)[0];
        break;
      case '--scale':
        o.scale = ints(value(), flag)[0];
        break;
      case '--warmup': {
        const n = Number(value());
        if (!Number.isInteger(n) || n < 0) throw new Error('--warmup: not a non-negative integer');
        o.warmup = n;
        break;
      }
      case '--skip-memory':
        o.skipMemory = true;
        break;
      case '--memory-clients':
        o.memoryClients = ints(value(), flag).sort((x, y) => x - y);
        break;
      case '--profile':
        o.profile = true;
        break;
      case '--profile-clients':
        o.profileClients = ints(value(), flag)[0];
        break;
      case '--profile-protocol':
        o.profileProtocol = oneOf(value(), PROTOCOLS, flag)[0];
        break;
      default:
        throw unknown();
    }
  }
  if (o.duration > 600) throw new Error('--duration: at most 600 s per cell');
  if (o.memoryClients.some((n) => n > 15000)) throw new Error('--memory-clients: at most 15000 (file descriptor limits)');
  return o;
}

// ------------------------------------------------------------------ process plumbing



function rssKiB(pid: number): number {
  const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]);
}

// ------------------------------------------------------------------ environment

const BENCH_USER = 'bench';
const BENCH_PASSWORD = 'bench-password-not-secret';
const BENCH_DB = 'bench';

function findPgbouncer(): string | null {
  for (const p of ['/usr/sbin/pgbouncer', '/usr/bin/pgbouncer', '/usr/local/bin/pgbouncer', '/usr/local/sbin/pgbouncer']) {
    if (fs.existsSync(p)) return p;
  }
  const r = spawnSync('bash', ['-c', 'command -v pgbouncer'], { encoding: 'utf8' });
  const p = r.stdout?.trim();
  return r.status === 0 && p ? p : null;
}

async function ensurePgbouncer(): Promise<string | null> {
  const found = findPgbouncer();
  if (found) return found;
  if (process.getuid?.() !== 0) {
    log('pgbouncer is not installed and we are not root: PgBouncer columns will be n/a');
    return null;
  }
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  log('pgbouncer not found: apt-get install -y pgbouncer');
  let r = await run('apt-get', ['install', '-y', 'pgbouncer'], { env, timeoutMs: 300_000 });
  if (r.code !== 0) {
    log('install failed; apt-get update and retry');
    await run('apt-get', ['update'], { env, timeoutMs: 300_000 });
    r = await run('apt-get', ['install', '-y', 'pgbouncer'], { env, timeoutMs: 300_000 });
  }
  if (r.code !== 0) {
    log(`could not install pgbouncer (PgBouncer columns will be n/a):\n${r.stderr.slice(-2000)}`);
    return null;
  }
  // The Debian package starts a system pgbouncer on 6432; we run our own on a free port instead.
  await run('bash', ['-c', 'service pgbouncer stop || true'], { timeoutMs: 30_000 });
  return findPgbouncer();
}

function postgresIdentity(): { uid: number; gid: number } | null {
  const uid = spawnSync('id', ['-u', 'postgres'], { encoding: 'utf8' });
  const gid = spawnSync('id', ['-g', 'postgres'], { encoding: 'utf8' });
  if (uid.status !== 0 || gid.status !== 0) return null;
  return { uid: Number(uid.stdout.trim()), gid: Number(gid.stdout.trim()) };
}

// ------------------------------------------------------------------ pgbouncer

async function startPgbouncer(bin: string, dir: string, pg: EmbeddedPostgres, verifier: string, poolSize: number): Promise<ListeningChild> {
  const port = await findFreePort();
  const authFile = path.join(dir, 'userlist.txt');
  const ini = path.join(dir, 'pgbouncer.ini');
  fs.writeFileSync(authFile, `"${BENCH_USER}" "${verifier}"\n`, { mode: 0o600 });
  fs.writeFileSync(
    ini,
    [
      '[databases]',
      `${BENCH_DB} = host=127.0.0.1 port=${pg.port} dbname=${BENCH_DB}`,
      '',
      '[pgbouncer]',
      'listen_addr = 127.0.0.1',
      `listen_port = ${port}`,
      'unix_socket_dir =',
      'auth_type = scram-sha-256',
      `auth_file = ${authFile}`,
      'pool_mode = transaction',
      `default_pool_size = ${poolSize}`,
      'min_pool_size = 0',
      'reserve_pool_size = 0',
      'max_client_conn = 11000',
      'max_db_connections = 0',
      'ignore_startup_parameters = extra_float_digits,options',
      'server_tls_sslmode = disable',
      'client_tls_sslmode = disable',
      'log_connections = 0',
      'log_disconnections = 0',
      'log_pooler_errors = 1',
      'stats_period = 3600',
      '',
    ].join('\n'),
    { mode: 0o600 },
  );
  const asRoot = process.getuid?.() === 0;
  if (asRoot) {
    const id = postgresIdentity();
    if (!id) throw new Error('no "postgres" OS user to run pgbouncer as (it refuses to run as root)');
    fs.chmodSync(dir, 0o755);
    fs.chownSync(authFile, id.uid, id.gid);
    fs.chownSync(ini, id.uid, id.gid);
  }
  const args = asRoot ? ['-u', 'postgres', ini] : [ini];
  const cp = spawnWithMaxOpenFiles(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const tail = tailKeeper();
  readline.createInterface({ input: cp.stdout! }).on('line', tail.push);
  readline.createInterface({ input: cp.stderr! }).on('line', tail.push);
  try {
    await waitForPort(port, cp, 20_000, 'pgbouncer', tail.text);
  } catch (err) {
    await killChild(cp);
    throw err;
  }
  return { cp, pid: cp.pid!, port, tail: tail.text };
}

// ------------------------------------------------------------------ pgbench

type CellStatus = 'ok' | 'failed' | 'unsupported' | 'skipped';

interface Measurement extends PgbenchSummary {
  status: CellStatus;
  /** CPU used by processes outside this benchmark during the run, % of one core (noise indicator). */
  foreignCpuPct?: number;
  /** CPU time the pooler process spent per transaction (µs), for trustgate and PgBouncer. */
  poolerCpuUsPerTxn?: number;
  /** Pooler process CPU during the run, % of one core. */
  poolerCpuPct?: number;
  error?: string;
}

interface Cell {
  clients: number;
  protocol: Protocol;
  results: Record<Target, Measurement>;
}

async function pgbench(port: number, clients: number, protocol: Protocol, duration: number, poolerPid?: number): Promise<Measurement> {
  const args = ['-S', '-n', '-T', String(duration), '-c', String(clients), '-j', String(Math.min(clients, 2)), '-M', protocol];
  args.push(...pgbenchTarget(port, BENCH_USER, BENCH_DB));
  const r = await runPgbench(args, BENCH_PASSWORD, duration * 1000 + 180_000, poolerPid);
  const { tps, latencyMs, transactions, failedTransactions, foreignCpuPct } = r;
  if (r.exit.code === 0 && tps !== null) {
    const pooler = r.poolerCpu ? { poolerCpuUsPerTxn: r.poolerCpu.usPerTxn, poolerCpuPct: r.poolerCpu.pctOfCore } : {};
    return { status: 'ok', tps, latencyMs, transactions, failedTransactions, foreignCpuPct, ...pooler };
  }
  return { status: 'failed', tps, latencyMs, transactions, failedTransactions, foreignCpuPct, error: pgbenchFailure(r, 3, 500) };
}

// ------------------------------------------------------------------ idle-client memory

interface MemoryPoint {
  clients: number;
  opened: number;
  rssKiB: number;
  heapUsedKiB?: number;
}

interface MemoryResult {
  target: 'trustgate' | 'pgbouncer';
  baselineRssKiB: number;
  baselineHeapUsedKiB?: number;
  points: (MemoryPoint & { kibPerClient: number; heapKibPerClient?: number })[];
  error?: string;
}

/** Opens up to `n` authenticated connections (bounded concurrency and time); returns them. */
async function openIdle(port: number, n: number, keys: { clientKey: Buffer; serverKey: Buffer }, into: ServerConnection[]): Promise<number> {
  const silent = createLogger('silent');
  const endpoint = { host: '127.0.0.1', port, tls: { mode: 'disable' as const }, connectTimeoutMs: 30_000 };
  const deadline = Date.now() + 180_000;
  let started = 0;
  let opened = 0;
  let failures = 0;
  let lastError = '';
  const worker = async () => {
    while (started < n && Date.now() < deadline && failures < 20) {
      started++;
      try {
        into.push(await ServerConnection.connect(endpoint, BENCH_DB, BENCH_USER, { scramKeys: keys }, new Map(), silent));
        opened++;
      } catch (err) {
        failures++;
        lastError = (err as Error).message;
      }
    }
  };
  await Promise.all(Array.from({ length: 64 }, worker));
  if (opened < n) throw new Error(`opened only ${opened}/${n} idle connections (${failures} failures; last: ${lastError})`);
  return opened;
}

async function measureIdleMemory(
  target: 'trustgate' | 'pgbouncer',
  port: number,
  pid: number,
  counts: number[],
  keys: { clientKey: Buffer; serverKey: Buffer },
  heap?: () => Promise<NodeJS.MemoryUsage>,
): Promise<MemoryResult> {
  const conns: ServerConnection[] = [];
  const settle = async () => {
    await sleep(1500);
    const m = heap ? await heap() : undefined;
    await sleep(500);
    return { rssKiB: rssKiB(pid), heapUsedKiB: m ? Math.round(m.heapUsed / 1024) : undefined };
  };
  try {
    // Warm-up: one client runs a query (loads the pool, the auth connection, code paths), then leaves.
    const warm: ServerConnection[] = [];
    await openIdle(port, 1, keys, warm);
    await warm[0].internalQuery('SELECT 1');
    warm[0].terminate();
    const base = await settle();
    const result: MemoryResult = { target, baselineRssKiB: base.rssKiB, baselineHeapUsedKiB: base.heapUsedKiB, points: [] };
    for (const n of counts) {
      log(`${target}: opening idle clients up to ${n}`);
      await openIdle(port, n - conns.length, keys, conns);
      const m = await settle();
      result.points.push({
        clients: n,
        opened: conns.length,
        rssKiB: m.rssKiB,
        heapUsedKiB: m.heapUsedKiB,
        kibPerClient: (m.rssKiB - base.rssKiB) / n,
        heapKibPerClient: m.heapUsedKiB !== undefined && base.heapUsedKiB !== undefined ? (m.heapUsedKiB - base.heapUsedKiB) / n : undefined,
      });
      log(`${target}: ${n} idle clients: RSS ${m.rssKiB} KiB (baseline ${base.rssKiB} KiB, ${((m.rssKiB - base.rssKiB) / n).toFixed(1)} KiB/client)`);
    }
    return result;
  } finally {
    for (const c of conns) c.terminate();
    await sleep(1000);
    for (const c of conns) c.destroy();
  }
}

// ------------------------------------------------------------------ output

const fmtLat = (n: number | null | undefined) => (n === null || n === undefined ? '–' : n.toFixed(3));

function cellText(m: Measurement | undefined, f: (x: number | null) => string, which: 'tps' | 'lat'): string {
  if (!m || m.status === 'skipped') return '–';
  if (m.status === 'unsupported') return 'n/a (unsupported)';
  if (m.status === 'failed') return 'failed';
  return f(which === 'tps' ? m.tps : m.latencyMs);
}

function ratio(a: Measurement | undefined, b: Measurement | undefined): string {
  if (a?.status !== 'ok' || b?.status !== 'ok' || !a.tps || !b.tps) return '–';
  return `${(a.tps / b.tps).toFixed(2)}×`;
}

function markdownTable(cells: Cell[]): string {
  const head = [
    'clients',
    'protocol',
    'direct tps',
    'trustgate tps',
    'pgbouncer tps',
    'trustgate/pgbouncer',
    'trustgate/direct',
    'direct lat ms',
    'trustgate lat ms',
    'pgbouncer lat ms',
  ];
  const rows = cells.map((c) => {
    const r = c.results;
    return [
      String(c.clients),
      c.protocol,
      cellText(r.direct, fmtInt, 'tps'),
      cellText(r.trustgate, fmtInt, 'tps'),
      cellText(r.pgbouncer, fmtInt, 'tps'),
      ratio(r.trustgate, r.pgbouncer),
      ratio(r.trustgate, r.direct),
      cellText(r.direct, fmtLat, 'lat'),
      cellText(r.trustgate, fmtLat, 'lat'),
      cellText(r.pgbouncer, fmtLat, 'lat'),
    ];
  });
  const align = head.map((_, i) => (i < 2 ? ':--' : '--:'));
  return [head, align, ...rows].map((r) => `| ${r.join(' | ')} |`).join('\n');
}

function poolerCpuTable(cells: Cell[]): string {
  const v = (m: Measurement | undefined, k: 'poolerCpuUsPerTxn' | 'poolerCpuPct') => (m?.status === 'ok' && m[k] !== undefined ? String(m[k]) : '–');
  const lines = [
    '| clients | protocol | trustgate µs CPU/txn | pgbouncer µs CPU/txn | trustgate CPU % of a core | pgbouncer CPU % of a core |',
    '| :-- | :-- | --: | --: | --: | --: |',
  ];
  for (const c of cells) {
    lines.push(`| ${c.clients} | ${c.protocol} | ${v(c.results.trustgate, 'poolerCpuUsPerTxn')} | ${v(c.results.pgbouncer, 'poolerCpuUsPerTxn')} | ${v(c.results.trustgate, 'poolerCpuPct')} | ${v(c.results.pgbouncer, 'poolerCpuPct')} |`);
  }
  return lines.join('\n');
}

function memoryTable(mem: MemoryResult[]): string {
  const lines = ['| target | idle clients | RSS before (KiB) | RSS after (KiB) | KiB per idle client | JS heap KiB per client |', '| :-- | --: | --: | --: | --: | --: |'];
  for (const m of mem) {
    if (m.error) {
      lines.push(`| ${m.target} | – | – | – | failed: ${m.error.replace(/\|/g, '/').slice(0, 120)} | – |`);
      continue;
    }
    for (const p of m.points) {
      lines.push(
        `| ${m.target} | ${fmtInt(p.clients)} | ${fmtInt(m.baselineRssKiB)} | ${fmtInt(p.rssKiB)} | ${p.kibPerClient.toFixed(1)} | ${p.heapKibPerClient === undefined ? '–' : p.heapKibPerClient.toFixed(1)} |`,
      );
    }
  }
  return lines.join('\n');
}

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

function niceMax(v: number): number {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function svgChart(cells: Cell[], targets: Target[], subtitle: string): string {
  const colors: Record<Target, string> = { direct: '#7f8c8d', trustgate: '#2c7be5', pgbouncer: '#e8833a' };
  const barW = 26;
  const gap = 34;
  const groupW = targets.length * barW + gap;
  const left = 80;
  const top = 70;
  const plotH = 320;
  const bottom = 70;
  const width = Math.max(640, left + cells.length * groupW + 30);
  const height = top + plotH + bottom;
  const maxTps = Math.max(1, ...cells.flatMap((c) => targets.map((t) => (c.results[t]?.status === 'ok' ? (c.results[t].tps ?? 0) : 0))));
  const yMax = niceMax(maxTps * 1.08);
  const y = (v: number) => top + plotH - (v / yMax) * plotH;
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="system-ui, -apple-system, Segoe UI, sans-serif">`);
  out.push(`<rect width="${width}" height="${height}" fill="#ffffff"/>`);
  out.push(`<text x="${left}" y="26" font-size="17" font-weight="600" fill="#222">pgbench -S: transactions per second (higher is better)</text>`);
  out.push(`<text x="${left}" y="46" font-size="12" fill="#555">${esc(subtitle)}</text>`);
  for (let i = 0; i <= 5; i++) {
    const v = (yMax / 5) * i;
    const yy = y(v);
    out.push(`<line x1="${left}" y1="${yy.toFixed(1)}" x2="${width - 20}" y2="${yy.toFixed(1)}" stroke="${i === 0 ? '#444' : '#e3e3e3'}" stroke-width="1"/>`);
    out.push(`<text x="${left - 8}" y="${(yy + 4).toFixed(1)}" font-size="11" text-anchor="end" fill="#444">${fmtInt(v)}</text>`);
  }
  out.push(`<text x="18" y="${top + plotH / 2}" font-size="12" fill="#444" transform="rotate(-90 18 ${top + plotH / 2})" text-anchor="middle">tps</text>`);
  cells.forEach((c, gi) => {
    const gx = left + gap / 2 + gi * groupW;
    targets.forEach((t, ti) => {
      const m = c.results[t];
      const x = gx + ti * barW;
      if (m?.status === 'ok' && m.tps !== null) {
        const yy = y(m.tps);
        out.push(`<rect x="${x + 2}" y="${yy.toFixed(1)}" width="${barW - 4}" height="${(top + plotH - yy).toFixed(1)}" fill="${colors[t]}"><title>${esc(`${c.clients} clients, ${c.protocol}, ${t}: ${fmtInt(m.tps)} tps, ${fmtLat(m.latencyMs)} ms`)}</title></rect>`);
        const label = m.tps >= 10000 ? `${(m.tps / 1000).toFixed(0)}k` : m.tps >= 1000 ? `${(m.tps / 1000).toFixed(1)}k` : fmtInt(m.tps);
        out.push(`<text x="${x + barW / 2}" y="${(yy - 4).toFixed(1)}" font-size="9" text-anchor="middle" fill="#333">${label}</text>`);
      } else {
        const txt = m?.status === 'unsupported' ? 'n/a' : m?.status === 'failed' ? 'fail' : '–';
        out.push(`<text x="${x + barW / 2}" y="${top + plotH - 6}" font-size="9" text-anchor="middle" fill="#b00">${txt}</text>`);
      }
    });
    const cx = gx + (targets.length * barW) / 2;
    out.push(`<text x="${cx}" y="${top + plotH + 18}" font-size="11" text-anchor="middle" fill="#222">${c.clients} client${c.clients === 1 ? '' : 's'}</text>`);
    out.push(`<text x="${cx}" y="${top + plotH + 32}" font-size="11" text-anchor="middle" fill="#555">${c.protocol}</text>`);
  });
  let lx = left;
  for (const t of targets) {
    out.push(`<rect x="${lx}" y="${height - 22}" width="12" height="12" fill="${colors[t]}"/>`);
    out.push(`<text x="${lx + 17}" y="${height - 12}" font-size="12" fill="#222">${t}</text>`);
    lx += 110;
  }
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}

// ------------------------------------------------------------------ main

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  const cellCount = opts.clients.length * opts.protocols.length * opts.targets.length;
  armWatchdog((cellCount * (opts.duration + 90) + opts.targets.length * (opts.warmup + 60) + 900 + (opts.profile ? opts.duration + 120 : 0)) * 1000);

  requireTools(['pgbench', 'psql']);
  const tmp = makeTempDir('trustgate-bench-');

  const wantBouncer = opts.targets.includes('pgbouncer');
  const bouncerBin = wantBouncer ? await ensurePgbouncer() : null;
  const launch = opts.targets.includes('trustgate') || opts.profile || !opts.skipMemory ? await prepareLauncher(opts, tmp) : null;

  const pg = await startPostgres();
  await pg.query(`CREATE ROLE ${BENCH_USER} LOGIN PASSWORD '${BENCH_PASSWORD}'`);
  await pg.query(`CREATE DATABASE ${BENCH_DB} OWNER ${BENCH_USER}`);
  await installAuthQuery(pg);
  const [{ rolpassword: verifier }] = await pg.query<{ rolpassword: string }>('SELECT rolpassword FROM pg_authid WHERE rolname = $1', [BENCH_USER]);
  const secret = parseScramVerifier(verifier);
  if (!secret) throw new Error(`role ${BENCH_USER} has no SCRAM verifier`);
  const keys = scramKeysForPassword(BENCH_PASSWORD, secret)!;
  const [{ server_version: pgVersion }] = await pg.query<{ server_version: string }>('SHOW server_version');

  log(`pgbench -i -s ${opts.scale}`);
  const init = await run('pgbench', ['-i', '-q', '-s', String(opts.scale), ...pgbenchTarget(pg.port, BENCH_USER, BENCH_DB)], {
    env: pgbenchEnv(BENCH_PASSWORD),
    timeoutMs: 900_000,
  });
  if (init.code !== 0) throw new Error(`pgbench -i failed:\n${init.stderr.slice(-2000)}`);

  const ports: Partial<Record<Target, number>> = { direct: pg.port };
  let gateway: GatewayChild | null = null;
  let bouncer: ListeningChild | null = null;
  const unavailable: Partial<Record<Target, string>> = {};
  if (opts.targets.includes('trustgate') && launch) {
    gateway = await startGatewayChild(launch, gatewayConfig(pg, opts.poolSize));
    ports.trustgate = gateway.port;
    log(`trustgate child pid ${gateway.pid} on port ${gateway.port} (${launchKind(launch)})`);
  }
  if (wantBouncer) {
    if (bouncerBin) {
      bouncer = await startPgbouncer(bouncerBin, tmp, pg, verifier, opts.poolSize);
      ports.pgbouncer = bouncer.port;
      log(`pgbouncer pid ${bouncer.pid} on port ${bouncer.port}`);
    } else unavailable.pgbouncer = 'pgbouncer not installed';
  }

  if (opts.warmup > 0) {
    for (const t of opts.targets) {
      const port = ports[t];
      if (port === undefined) continue;
      log(`warm-up ${t} (${opts.warmup} s, 32 clients, simple)`);
      await pgbench(port, 32, 'simple', opts.warmup);
    }
  }

  const cells: Cell[] = [];
  let i = 0;
  for (const clients of opts.clients) {
    for (const protocol of opts.protocols) {
      const cell: Cell = { clients, protocol, results: {} as Record<Target, Measurement> };
      for (const t of TARGETS) {
        const port = ports[t];
        if (!opts.targets.includes(t) || port === undefined) {
          cell.results[t] = { status: 'skipped', tps: null, latencyMs: null, transactions: null, failedTransactions: null, error: unavailable[t] };
          continue;
        }
        i++;
        const poolerPid = t === 'trustgate' ? gateway?.pid : t === 'pgbouncer' ? bouncer?.pid : undefined;
        const m = await pgbench(port, clients, protocol, opts.duration, poolerPid);
        if (m.status === 'failed' && t === 'pgbouncer' && protocol === 'prepared') m.status = 'unsupported';
        cell.results[t] = m;
        log(
          `[${i}/${cellCount}] ${String(clients).padStart(3)} clients ${protocol.padEnd(8)} ${t.padEnd(9)} ` +
            (m.status === 'ok' ? `${fmtInt(m.tps).padStart(8)} tps  ${fmtLat(m.latencyMs)} ms` : `${m.status}: ${m.error ?? ''}`) +
            (m.status === 'ok' && m.poolerCpuUsPerTxn !== undefined ? `  pooler ${m.poolerCpuUsPerTxn} µs CPU/txn (${m.poolerCpuPct}% of a core)` : '') +
            (m.foreignCpuPct !== undefined && m.foreignCpuPct >= 10 ? `  [other processes used ${m.foreignCpuPct}% of a core]` : ''),
        );
        if (t === 'trustgate' && gateway && exited(gateway.cp)) throw new Error(`trustgate child died:\n${gateway.tail()}`);
        if (t === 'pgbouncer' && bouncer && exited(bouncer.cp)) throw new Error(`pgbouncer died:\n${bouncer.tail()}`);
      }
      cells.push(cell);
    }
  }
  if (gateway) {
    await gateway.stop();
    gateway = null;
  }

  // ---------------------------------------------------------------- memory
  const memory: MemoryResult[] = [];
  if (!opts.skipMemory && launch) {
    const g = await startGatewayChild(launch, gatewayConfig(pg, opts.poolSize), { exposeGc: true });
    try {
      memory.push(await measureIdleMemory('trustgate', g.port, g.pid, opts.memoryClients, keys, () => g.mem()));
    } catch (err) {
      log(`trustgate memory measurement failed: ${(err as Error).message}`);
      memory.push({ target: 'trustgate', baselineRssKiB: 0, points: [], error: (err as Error).message });
    } finally {
      await g.stop();
    }
    if (bouncer) {
      try {
        memory.push(await measureIdleMemory('pgbouncer', bouncer.port, bouncer.pid, opts.memoryClients, keys));
      } catch (err) {
        log(`pgbouncer memory measurement failed: ${(err as Error).message}`);
        memory.push({ target: 'pgbouncer', baselineRssKiB: 0, points: [], error: (err as Error).message });
      }
    }
  }

  // ---------------------------------------------------------------- profile
  let profileText: string | null = null;
  if (opts.profile && launch) {
    const profDir = path.join(tmp, 'cpuprofile');
    fs.mkdirSync(profDir, { recursive: true });
    const g = await startGatewayChild(launch, gatewayConfig(pg, opts.poolSize), { cpuProfDir: profDir });
    let m: Measurement;
    try {
      log(`profiling trustgate: ${opts.profileClients} clients, ${opts.profileProtocol}, ${opts.duration} s`);
      await pgbench(g.port, opts.profileClients, opts.profileProtocol, Math.min(3, opts.duration));
      m = await pgbench(g.port, opts.profileClients, opts.profileProtocol, opts.duration);
    } finally {
      await g.stop();
    }
    const file = fs.readdirSync(profDir).find((f) => f.endsWith('.cpuprofile'));
    if (file) {
      const saved = path.join(opts.out, 'latest.cpuprofile');
      fs.mkdirSync(opts.out, { recursive: true });
      fs.copyFileSync(path.join(profDir, file), saved);
      const summary = summarizeProfile(saved, ROOT);
      profileText =
        `CPU profile of the trustgate child: pgbench -S -M ${opts.profileProtocol} -c ${opts.profileClients}, ${opts.duration} s ` +
        `(${m.status === 'ok' ? `${fmtInt(m.tps)} tps under the profiler` : m.status})\n\n${formatProfileSummary(summary, 30)}`;
      fs.writeFileSync(path.join(opts.out, 'latest-profile.txt'), profileText);
      log(`profile written to ${path.relative(ROOT, saved)} and latest-profile.txt`);
    } else log('no .cpuprofile was written');
  }

  // ---------------------------------------------------------------- report
  const machine = {
    ...describeMachine(pgVersion),
    pgbouncer: bouncerBin ? versionOf(bouncerBin, ['--version']) : 'not installed',
    openFilesLimit: spawnSync('bash', ['-c', 'ulimit -Hn'], { encoding: 'utf8' }).stdout.trim(),
  };
  const settings = {
    duration: opts.duration,
    scale: opts.scale,
    poolSize: opts.poolSize,
    poolMode: 'transaction',
    postgres: POSTGRES_SETTINGS,
    pgbench: `pgbench -S -n -T ${opts.duration} -c <clients> -j <min(clients,2)> -M <protocol>`,
    trustgate: `separate process (${launchKind(launch)}), log level warn, auth scram-sha-256 via auth query`,
    pgbouncer: 'auth_type scram-sha-256 (auth_file with the pg_authid verifier), pool_mode transaction, log_connections/disconnections off',
    warmup: opts.warmup,
  };
  const noise = { max: 0, noisy: [] as string[] };
  for (const c of cells) {
    for (const t of TARGETS) {
      const f = c.results[t]?.foreignCpuPct;
      if (f === undefined) continue;
      noise.max = Math.max(noise.max, f);
      if (f >= 10) noise.noisy.push(`${c.clients}/${c.protocol}/${t} ${f}%`);
    }
  }
  const date = new Date().toISOString();
  const table = markdownTable(cells);
  const subtitle = `${machine.cores} cores · node ${machine.node} · PostgreSQL ${machine.postgres} · ${machine.pgbouncer} · pool ${opts.poolSize} (transaction) · ${opts.duration} s/cell · ${date.slice(0, 10)}`;
  fs.mkdirSync(opts.out, { recursive: true });
  fs.writeFileSync(path.join(opts.out, 'latest.json'), `${JSON.stringify({ date, machine, settings, cells, memory, profile: profileText }, null, 2)}\n`);
  const md = [
    '# trustgate benchmark',
    '',
    `- date: ${date}`,
    `- machine: ${machine.cores} cores (${machine.cpu}), ${machine.memoryGiB} GiB, ${machine.kernel}`,
    `- node ${machine.node}; PostgreSQL ${machine.postgres} (embedded, max_connections 400, shared_buffers 256MB); ${machine.pgbench}; ${machine.pgbouncer}`,
    `- workload: \`${settings.pgbench}\` after \`pgbench -i -s ${opts.scale}\`; ${opts.duration} s per cell; ${opts.warmup} s unrecorded warm-up per target`,
    `- both poolers: transaction mode, pool size ${opts.poolSize} server connections; clients authenticate with SCRAM-SHA-256; everything on 127.0.0.1 TCP`,
    '- everything (pgbench, poolers, PostgreSQL) shares the same cores, so pooler CPU competes with PostgreSQL and pgbench',
    '- "n/a (unsupported)": PgBouncer < 1.21 cannot keep protocol-level prepared statements in transaction mode (pgbench fails with "prepared statement … already exists/does not exist"); with 1 client it can work by luck, because the client keeps getting the same server connection',
    `- noise: CPU used by processes outside the benchmark during a cell was at most ${noise.max}% of one core${noise.noisy.length ? ` (≥ 10% in: ${noise.noisy.join(', ')})` : ''}`,
    '',
    '## pgbench -S (tps, mean latency)',
    '',
    table,
    '',
    '![tps chart](latest.svg)',
    '',
    '## Pooler CPU per transaction',
    '',
    'utime + stime of the pooler process (/proc/<pid>/stat) during the cell divided by the transactions pgbench completed. On this box everything shares the cores, so pooler CPU per transaction largely decides pooler throughput.',
    '',
    poolerCpuTable(cells),
    '',
  ];
  if (memory.length) {
    md.push('## Idle client connections (RSS of the pooler process)', '', memoryTable(memory), '');
    md.push('RSS from /proc/<pid>/status (VmRSS) after a 1 s settle (trustgate: after a forced GC); baseline after one warm-up client. Increments are cumulative from the baseline.', '');
  }
  if (profileText) md.push('## CPU profile', '', '```', profileText.trimEnd(), '```', '');
  fs.writeFileSync(path.join(opts.out, 'latest.md'), md.join('\n'));
  fs.writeFileSync(path.join(opts.out, 'latest.svg'), svgChart(cells, opts.targets, subtitle));

  console.log(`\n${table}\n`);
  console.log(`${poolerCpuTable(cells)}\n`);
  if (memory.length) console.log(`${memoryTable(memory)}\n`);
  if (profileText) console.log(`${profileText}\n`);
  console.log(`results: ${path.relative(process.cwd(), path.join(opts.out, 'latest.md'))}, latest.json, latest.svg`);
  if (bouncer) await killChild(bouncer.cp);
}

runBenchmark(main);
