/**
 * What the benchmark scripts (bench/run.ts, bench/trust.ts) share: the command line, child
 * processes with bounded waits and cleanup on every way out, CPU accounting from /proc, the
 * embedded PostgreSQL with trustgate's auth query, the trustgate gateway in its own process, and
 * running pgbench and reading its summary.
 */
import { spawn, spawnSync, type ChildProcess, type SpawnOptions } from 'node:child_process';
import net from 'node:net';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath, pathToFileURL } from 'node:url';
import ts from 'typescript';
import { EmbeddedPostgres } from '../src/embedded/postgres.js';
import { installAuthFunction } from '../src/server/install.js';
import { createLogger } from '../src/log/logger.js';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

// ------------------------------------------------------------------ log

const t0 = Date.now();
let logTag = 'bench';

/** Names the script in every log line (`[bench …s]`, `[bench:trust …s]`). */
export function setLogTag(tag: string): void {
  logTag = tag;
}

/** Progress goes to stderr, so stdout carries only the result tables. */
export function log(msg: string): void {
  const s = ((Date.now() - t0) / 1000).toFixed(1).padStart(6);
  process.stderr.write(`[${logTag} ${s}s] ${msg}\n`);
}

export const fmtInt = (n: number | null | undefined) => (n === null || n === undefined ? '–' : Math.round(n).toLocaleString('en-US'));

// ------------------------------------------------------------------ command line

export interface CommandLineFlag {
  flag: string;
  /** The flag's value: after `=`, or else the next argument (consumed). */
  value(): string;
  /** The error to throw for a flag the script does not know. */
  unknown(): Error;
}

/** The options every benchmark script has. */
export interface SharedOptions {
  /** Run tsc -p tsconfig.build.json first (--no-build: use dist/ as it is). */
  build: boolean;
  /** The results directory (--out). */
  out: string;
}

/**
 * The flags of a command line, one at a time (`--flag value` and `--flag=value` both work).
 * -h/--help (prints `usage` and exits), --no-build and --out are handled here and set `shared`,
 * so the scripts handle only their own flags.
 */
export function* commandLineFlags(argv: string[], usage: string, shared: SharedOptions): Generator<CommandLineFlag> {
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const eq = arg.indexOf('=');
    const flag = eq > 0 ? arg.slice(0, eq) : arg;
    const value = () => {
      if (eq > 0) return arg.slice(eq + 1);
      const v = argv[++i];
      if (v === undefined) throw new Error(`${flag} needs a value`);
      return v;
    };
    if (flag === '-h' || flag === '--help') {
      console.log(usage);
      process.exit(0);
    }
    if (flag === '--no-build') shared.build = false;
    else if (flag === '--out') shared.out = path.resolve(value());
    else yield { flag, value, unknown: () => new Error(`unknown option ${arg}\n${usage}`) };
  }
}

// ------------------------------------------------------------------ child processes

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

/** Every child still running; cleanup() ends them all, however the script ends. */
const children = new Set<ChildProcess>();

export function track(cp: ChildProcess): ChildProcess {
  children.add(cp);
  cp.once('exit', () => children.delete(cp));
  return cp;
}

/** Runs a command to completion, killing it after `timeoutMs`. */
export function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs: number; cwd?: string }): Promise<RunResult> {
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
      resolve({ code: -1, signal: null, stdout, stderr: stderr + String(err), timedOut });
    });
    cp.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, timedOut });
    });
  });
}

/**
 * Starts a long-running child with the open-files limit raised to the hard limit (node cannot
 * setrlimit), for thousands of client connections. `exec` keeps the pid the child's own.
 */
export function spawnWithMaxOpenFiles(cmd: string, args: string[], options: SpawnOptions): ChildProcess {
  return track(spawn('bash', ['-c', 'ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$0" "$@"', cmd, ...args], options));
}

export function exited(cp: ChildProcess): boolean {
  return cp.exitCode !== null || cp.signalCode !== null;
}

/** SIGTERM, then SIGKILL after `graceMs`; resolves when the process is gone (bounded). */
export async function killChild(cp: ChildProcess, graceMs = 5000): Promise<void> {
  if (exited(cp)) return;
  const gone = new Promise<void>((r) => cp.once('exit', () => r()));
  cp.kill('SIGTERM');
  const t = await Promise.race([gone.then(() => true), sleep(graceMs).then(() => false)]);
  if (!t && !exited(cp)) {
    cp.kill('SIGKILL');
    await Promise.race([gone, sleep(2000)]);
  }
}

export interface Tail {
  push(line: string): void;
  text(): string;
}

/** Keeps the last lines a process wrote, for error messages. */
export function tailKeeper(max = 60): Tail {
  const lines: string[] = [];
  return {
    push: (line) => {
      lines.push(line);
      if (lines.length > max) lines.shift();
    },
    text: () => lines.join('\n'),
  };
}

// ------------------------------------------------------------------ CPU accounting (/proc)

/*
 * To tell how much of the machine something outside this benchmark used during a measurement
 * (other jobs on a shared box make numbers noisy), and what one process (the pooler) cost per
 * transaction. Our share is the CPU of this process and all its live descendants plus what they
 * reaped (cutime/cstime), so exited backends count too.
 */

const CLK_TCK = 100;

export interface CpuSnapshot {
  /** Busy ticks of the whole machine. */
  busy: number;
  /** Ticks of this process tree. */
  ours: number;
  at: number;
}

/** The fields of /proc/<pid>/stat after the command name (which may hold spaces): [0] is state. */
function procStatFields(pid: number | string): string[] {
  const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  return st.slice(st.lastIndexOf(')') + 2).split(' ');
}

function machineBusyTicks(): number {
  const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  // user nice system idle iowait irq softirq steal
  return f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] ?? 0);
}

/** Parent and CPU ticks (own and reaped children's) of every process. */
function allProcesses(): Map<number, { ppid: number; cpu: number }> {
  const stats = new Map<number, { ppid: number; cpu: number }>();
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const x = procStatFields(d);
      stats.set(Number(d), { ppid: Number(x[1]), cpu: Number(x[11]) + Number(x[12]) + Number(x[13]) + Number(x[14]) });
    } catch {
      /* gone */
    }
  }
  return stats;
}

function treeCpuTicks(stats: Map<number, { ppid: number; cpu: number }>, root: number): number {
  const kids = new Map<number, number[]>();
  for (const [pid, s] of stats) {
    const k = kids.get(s.ppid);
    if (k) k.push(pid);
    else kids.set(s.ppid, [pid]);
  }
  let ticks = 0;
  const stack = [root];
  for (let n = 0; stack.length && n < 100_000; n++) {
    const pid = stack.pop()!;
    ticks += stats.get(pid)?.cpu ?? 0;
    for (const c of kids.get(pid) ?? []) stack.push(c);
  }
  return ticks;
}

export function cpuSnapshot(): CpuSnapshot {
  const busy = machineBusyTicks();
  return { busy, ours: treeCpuTicks(allProcesses(), process.pid), at: Date.now() };
}

/** CPU used outside this benchmark's process tree between two snapshots, in % of one core. */
export function foreignCpuPct(a: CpuSnapshot, b: CpuSnapshot): number {
  const secs = Math.max(0.001, (b.at - a.at) / 1000);
  const foreign = Math.max(0, b.busy - a.busy - (b.ours - a.ours));
  return Math.round((100 * foreign) / CLK_TCK / secs);
}

/** utime + stime of one process, in clock ticks (NaN when it is gone). */
function processCpuTicks(pid: number): number {
  try {
    const x = procStatFields(pid);
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

// ------------------------------------------------------------------ environment

export function versionOf(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 10_000 });
  return (r.stdout || r.stderr || '').split('\n')[0].trim() || 'unknown';
}

export function requireTools(tools: string[]): void {
  for (const tool of tools) {
    if (spawnSync('bash', ['-c', `command -v ${tool}`]).status !== 0) throw new Error(`${tool} not found (install the PostgreSQL client tools)`);
  }
}

/** The machine and the software measured, for the result files. */
export function describeMachine(postgresVersion: string) {
  return {
    cores: os.cpus().length,
    cpu: os.cpus()[0]?.model ?? 'unknown',
    memoryGiB: Math.round(os.totalmem() / 2 ** 30),
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    postgres: postgresVersion,
    pgbench: versionOf('pgbench', ['--version']),
  };
}

// ------------------------------------------------------------------ cleanup and main

/** What cleanup() removes besides the children: set as soon as it exists. */
const cleanupState: { db?: EmbeddedPostgres; tmp?: string } = {};
let cleaning: Promise<void> | null = null;
let interrupted = false;

export function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    await Promise.all([...children].map((cp) => killChild(cp, 3000)));
    if (cleanupState.db) await cleanupState.db.stop().catch((err: unknown) => log(`warning: stopping PostgreSQL: ${String(err)}`));
    if (cleanupState.tmp) fs.rmSync(cleanupState.tmp, { recursive: true, force: true });
  })();
  return cleaning;
}

export function wasInterrupted(): boolean {
  return interrupted;
}

/** A temporary directory that cleanup() removes. */
export function makeTempDir(prefix: string): string {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  cleanupState.tmp = tmp;
  return tmp;
}

/** The backstop: nothing may run unbounded, so past `budgetMs` the run cleans up and fails. */
export function armWatchdog(budgetMs: number): void {
  setTimeout(() => {
    log(`watchdog: run exceeded ${Math.round(budgetMs / 1000)} s; aborting`);
    void cleanup().finally(() => process.exit(1));
  }, budgetMs).unref();
}

/** Runs a script's main with cleanup on success, failure and SIGINT/SIGTERM/SIGHUP. */
export function runBenchmark(main: () => Promise<void>): void {
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(sig, () => {
      interrupted = true;
      log(`${sig}: cleaning up`);
      setTimeout(() => process.exit(130), 30_000).unref();
      void cleanup().finally(() => process.exit(130));
    });
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
}

// ------------------------------------------------------------------ PostgreSQL

export const POSTGRES_SETTINGS = { max_connections: 400, shared_buffers: '256MB' };
/** trustgate's auth query: its role, and the database its function is installed in. */
export const AUTH_ROLE = 'trustgate_auth';
export const AUTH_DATABASE = 'postgres';
const AUTH_PASSWORD = 'trustgate-auth-bench-password';
/** The gateway child reads the auth role's password from this variable, not from its config. */
const AUTH_ENV = 'TRUSTGATE_BENCH_AUTH_PASSWORD';

/** Starts the embedded PostgreSQL; cleanup() stops it. */
export async function startPostgres(): Promise<EmbeddedPostgres> {
  log(`starting embedded PostgreSQL (max_connections ${POSTGRES_SETTINGS.max_connections}, shared_buffers ${POSTGRES_SETTINGS.shared_buffers})`);
  const db = new EmbeddedPostgres({ settings: POSTGRES_SETTINGS });
  cleanupState.db = db;
  await db.start();
  return db;
}

export async function installAuthQuery(db: EmbeddedPostgres): Promise<void> {
  await installAuthFunction(
    {
      endpoint: { host: db.host, port: db.port, tls: { mode: 'disable' }, connectTimeoutMs: 10_000 },
      database: AUTH_DATABASE,
      superuser: db.superuser,
      superuserPassword: db.superuserPassword,
      authRole: AUTH_ROLE,
      authRolePassword: AUTH_PASSWORD,
    },
    createLogger('silent'),
  );
}

// ------------------------------------------------------------------ trustgate child

export interface GatewayLaunch {
  /** Plain-JS launcher (transpiled bench/gateway-process.ts). */
  launcher: string;
  /** Gateway module URL for the launcher (compiled dist/gateway.js), or null to run src/ via tsx. */
  gatewayModule: string | null;
}

/** How the gateway child runs, for logs and reports. */
export const launchKind = (launch: GatewayLaunch | null) => (launch?.gatewayModule ? 'node dist/' : 'tsx src/');

/** Builds dist/ (unless told not to) and writes the launcher, so tsx is not on the hot path. */
export async function prepareLauncher(opts: { build: boolean }, tmp: string): Promise<GatewayLaunch> {
  if (opts.build) {
    log('building dist/ (npx tsc -p tsconfig.build.json)');
    const r = await run('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: ROOT, timeoutMs: 300_000 });
    if (r.code !== 0) log(`warning: tsc -p tsconfig.build.json exited ${r.code}:\n${(r.stdout + r.stderr).slice(-2000)}`);
  }
  // TRUSTGATE_BENCH_GATEWAY_MODULE=/path/to/other/dist/gateway.js benchmarks another build (A/B).
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

export function gatewayConfig(db: EmbeddedPostgres, poolSize: number, logLevel = 'warn'): Record<string, unknown> {
  return {
    listen: { host: '127.0.0.1', port: 0 },
    server: { host: db.host, port: db.port, tls: { mode: 'disable' } },
    auth: { method: 'scram-sha-256', user: AUTH_ROLE, password_env: AUTH_ENV, database: AUTH_DATABASE },
    pool: { mode: 'transaction', default_size: poolSize, max_client_connections: 11_000, wait_timeout_ms: 120_000 },
    log: { level: logLevel },
  };
}

/** A server the benchmark started in a child process (trustgate, PgBouncer). */
export interface ListeningChild {
  cp: ChildProcess;
  pid: number;
  port: number;
  /** Its last output lines, for error messages. */
  tail(): string;
}

export interface GatewayChild extends ListeningChild {
  /** Asks the child for process.memoryUsage() (after a GC when started with --expose-gc). */
  mem(): Promise<NodeJS.MemoryUsage>;
  /** Graceful stop (writes the CPU profile when --cpu-prof is on). */
  stop(): Promise<void>;
  /** Log lines (of level warn and above, or all at log level debug) since the last call. */
  takeLines(): string[];
}

export interface GatewayChildExtras {
  exposeGc?: boolean;
  cpuProfDir?: string;
}

function gatewayNodeArgs(launch: GatewayLaunch, extra: GatewayChildExtras): string[] {
  const nodeArgs: string[] = [];
  if (extra.exposeGc) nodeArgs.push('--expose-gc');
  if (extra.cpuProfDir) nodeArgs.push('--cpu-prof', '--cpu-prof-dir', extra.cpuProfDir);
  // Extra node flags for the gateway child, e.g. TRUSTGATE_BENCH_NODE_FLAGS=--perf-basic-prof for perf(1).
  nodeArgs.push(...(process.env.TRUSTGATE_BENCH_NODE_FLAGS ?? '').split(/\s+/).filter(Boolean));
  if (launch.gatewayModule) nodeArgs.push(launch.launcher);
  else nodeArgs.push('--import', 'tsx', path.join(ROOT, 'bench', 'gateway-process.ts'));
  return nodeArgs;
}

function gatewayEnv(launch: GatewayLaunch, config: Record<string, unknown>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, TRUSTGATE_BENCH_CONFIG: JSON.stringify(config), [AUTH_ENV]: AUTH_PASSWORD };
  if (launch.gatewayModule) env.TRUSTGATE_GATEWAY_MODULE = launch.gatewayModule;
  else delete env.TRUSTGATE_GATEWAY_MODULE;
  return env;
}

type Reply = Record<string, unknown>;

/** The launcher's replies on stdout ({"port":…} once listening, {"mem":…} on request); all else is log. */
function parseReply(line: string): Reply | null {
  if (!line.startsWith('{"port":') && !line.startsWith('{"mem":')) return null;
  try {
    return JSON.parse(line) as Reply;
  } catch {
    return null;
  }
}

/** Waits for the child's replies by key, each wait bounded and ended by the child's exit. */
function replyWaiter(cp: ChildProcess, tail: Tail) {
  const waiters: ((msg: Reply) => boolean)[] = [];
  return {
    deliver(msg: Reply): void {
      const i = waiters.findIndex((w) => w(msg));
      if (i >= 0) waiters.splice(i, 1);
    },
    next<T>(key: string, timeoutMs: number): Promise<T> {
      return new Promise((resolve, reject) => {
        const w = (msg: Reply) => {
          if (!(key in msg)) return false;
          clearTimeout(timer);
          cp.off('exit', onExit);
          resolve(msg as T);
          return true;
        };
        const onExit = () => {
          clearTimeout(timer);
          reject(new Error(`trustgate child exited (code ${cp.exitCode}):\n${tail.text()}`));
        };
        const timer = setTimeout(() => {
          const i = waiters.indexOf(w);
          if (i >= 0) waiters.splice(i, 1);
          cp.off('exit', onExit);
          reject(new Error(`trustgate child: no "${key}" reply within ${timeoutMs} ms:\n${tail.text()}`));
        }, timeoutMs);
        cp.once('exit', onExit);
        waiters.push(w);
      });
    },
  };
}

/** Starts trustgate in its own process (so its CPU time is its own); resolves once it listens. */
export async function startGatewayChild(launch: GatewayLaunch, config: Record<string, unknown>, extra: GatewayChildExtras = {}): Promise<GatewayChild> {
  const cp = spawnWithMaxOpenFiles(process.execPath, gatewayNodeArgs(launch, extra), { cwd: ROOT, env: gatewayEnv(launch, config), stdio: ['pipe', 'pipe', 'pipe'] });
  const tail = tailKeeper();
  const replies = replyWaiter(cp, tail);
  let recent: string[] = [];
  const keep = (line: string) => {
    tail.push(line);
    if (recent.length < 10_000) recent.push(line);
  };
  readline.createInterface({ input: cp.stdout! }).on('line', (line) => {
    const reply = parseReply(line);
    if (reply) replies.deliver(reply);
    else keep(line);
  });
  readline.createInterface({ input: cp.stderr! }).on('line', keep);
  cp.stdin!.on('error', () => undefined);
  let hello: { port: number; pid: number };
  try {
    hello = await replies.next<{ port: number; pid: number }>('port', 60_000);
  } catch (err) {
    await killChild(cp);
    throw err;
  }
  return {
    cp,
    pid: hello.pid,
    port: hello.port,
    async mem() {
      const p = replies.next<{ mem: NodeJS.MemoryUsage }>('mem', 30_000);
      cp.stdin!.write('mem\n');
      return (await p).mem;
    },
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

// ------------------------------------------------------------------ pgbench

export function pgbenchEnv(password: string): NodeJS.ProcessEnv {
  return { ...process.env, PGPASSWORD: password, PGSSLMODE: 'disable', PGCONNECT_TIMEOUT: '60', PGAPPNAME: 'pgbench' };
}

/** pgbench's connection arguments: everything goes over 127.0.0.1 TCP. */
export function pgbenchTarget(port: number, user: string, database: string): string[] {
  return ['-h', '127.0.0.1', '-p', String(port), '-U', user, database];
}

/** The numbers of pgbench's summary, null where it printed none. */
export interface PgbenchSummary {
  tps: number | null;
  latencyMs: number | null;
  transactions: number | null;
  failedTransactions: number | null;
}

export interface PgbenchRun extends PgbenchSummary {
  exit: RunResult;
  /** stdout and stderr together: the summary is on stdout, errors on stderr. */
  output: string;
  /** CPU used by processes outside this benchmark during the run, % of one core (noise indicator). */
  foreignCpuPct: number;
  /** CPU of this benchmark's whole process tree (pgbench, poolers, PostgreSQL) per transaction, µs. */
  treeCpuUsPerTxn?: number;
  /** The pooler process's CPU per transaction (µs) and during the run (% of one core). */
  poolerCpu?: { usPerTxn: number; pctOfCore: number };
  /** The pooler process's read / write system calls per transaction. */
  poolerSyscalls?: { readsPerTxn: number; writesPerTxn: number };
}

function parsePgbenchSummary(output: string): PgbenchSummary {
  const num = (re: RegExp) => {
    const m = re.exec(output);
    return m ? Number(m[1]) : null;
  };
  return {
    // "(without initial connection time)", or with -C "(including reconnection times)".
    tps: num(/^tps = ([\d.]+) \(/m),
    latencyMs: num(/^latency average = ([\d.]+) ms/m),
    transactions: num(/^number of transactions actually processed: (\d+)/m),
    failedTransactions: num(/^number of failed transactions: (\d+)/m),
  };
}

const perTxn = (total: number, transactions: number) => Math.round((10 * total) / transactions) / 10;

/** Runs pgbench with a bounded wait and measures the CPU (and the pooler's CPU and syscalls) it took. */
export async function runPgbench(args: string[], password: string, timeoutMs: number, poolerPid?: number): Promise<PgbenchRun> {
  const before = cpuSnapshot();
  const poolerTicksBefore = poolerPid ? processCpuTicks(poolerPid) : NaN;
  const syscallsBefore = poolerPid ? processSyscalls(poolerPid) : null;
  const exit = await run('pgbench', args, { env: pgbenchEnv(password), timeoutMs });
  const poolerTicks = poolerPid ? processCpuTicks(poolerPid) - poolerTicksBefore : NaN;
  const syscallsAfter = poolerPid ? processSyscalls(poolerPid) : null;
  const after = cpuSnapshot();
  const output = `${exit.stdout}\n${exit.stderr}`;
  const summary = parsePgbenchSummary(output);
  const result: PgbenchRun = { exit, output, ...summary, foreignCpuPct: foreignCpuPct(before, after) };
  const txns = summary.transactions;
  if (!txns) return result;
  result.treeCpuUsPerTxn = Math.round((((after.ours - before.ours) / CLK_TCK) * 1e6) / txns);
  if (Number.isFinite(poolerTicks)) {
    result.poolerCpu = {
      usPerTxn: perTxn((poolerTicks / CLK_TCK) * 1e6, txns),
      pctOfCore: Math.round((100 * poolerTicks) / CLK_TCK / Math.max(0.001, (after.at - before.at) / 1000)),
    };
  }
  if (syscallsBefore && syscallsAfter) {
    result.poolerSyscalls = { readsPerTxn: perTxn(syscallsAfter.r - syscallsBefore.r, txns), writesPerTxn: perTxn(syscallsAfter.w - syscallsBefore.w, txns) };
  }
  return result;
}

/** A failed run in one line: its first error lines, or else its last lines. */
export function pgbenchFailure(r: PgbenchRun, maxErrorLines: number, maxChars: number): string {
  const errLines = r.output
    .split('\n')
    .filter((l) => /error|fatal|abort/i.test(l))
    .slice(0, maxErrorLines)
    .join(' | ');
  return `${r.exit.timedOut ? 'timed out; ' : ''}exit ${r.exit.code}: ${errLines || r.output.trim().split('\n').slice(-3).join(' | ')}`.slice(0, maxChars);
}

/** The code measured: HEAD and the files under src/ that differ from it (others may be editing). */
export function gitState(): { commit: string; dirtySrc: string[] } {
  const head = spawnSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: ROOT, encoding: 'utf8' });
  const st = spawnSync('git', ['status', '--porcelain', '--', 'src'], { cwd: ROOT, encoding: 'utf8' });
  return {
    commit: head.status === 0 ? head.stdout.trim() : 'unknown',
    dirtySrc: st.status === 0 ? st.stdout.split('\n').filter(Boolean).map((l) => l.slice(3)) : [],
  };
}

export function tcpProbe(port: number, timeoutMs = 500): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    const done = (ok: boolean) => {
      s.removeAllListeners();
      s.destroy();
      resolve(ok);
    };
    s.setTimeout(timeoutMs, () => done(false));
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
  });
}

export async function waitForPort(port: number, cp: ChildProcess, timeoutMs: number, what: string, tail: () => string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (exited(cp)) throw new Error(`${what} exited during startup (code ${cp.exitCode}):\n${tail()}`);
    if (await tcpProbe(port)) return;
    await sleep(100);
  }
  throw new Error(`${what} did not listen on port ${port} within ${timeoutMs} ms:\n${tail()}`);
}
