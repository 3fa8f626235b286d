#!/usr/bin/env node
/** The `trustgate` command: a thin layer over the library (see docs/cli.md). */
import { parseArgs } from 'node:util';
import { readFileSync } from 'node:fs';
import { createGateway, VERSION } from '../gateway.js';
import { loadConfig, ConfigError } from '../config/load.js';
import { makeScramVerifier } from '../auth/scram.js';
import { installAuthFunction } from '../server/install.js';
import { createLogger } from '../log/logger.js';
import { startDemo } from '../demo/demo.js';

const USAGE = `trustgate ${VERSION} — PostgreSQL gateway

Usage:
  trustgate start  --config FILE [flags]   run the gateway
  trustgate check  --config FILE [flags]   validate the configuration and exit
  trustgate demo   [--port N] [--data-dir DIR] [--pool-mode M]
                                           embedded PostgreSQL + demo schema + gateway
  trustgate init   --server-url URL [--auth-role NAME]
                                           install the auth-query function (as a superuser URL);
                                           the auth role's password comes from TRUSTGATE_AUTH_PASSWORD
  trustgate scram-verifier                 read a password on stdin, print a SCRAM-SHA-256 verifier
                                           for a users file
Flags (override the file; also as TRUSTGATE_* environment variables, see docs/configuration.md):
  --listen-host H  --listen-port N  --server-host H  --server-port N
  --pool-mode session|transaction  --pool-size N  --log-level LEVEL
Signals: SIGHUP reloads the configuration, SIGTERM/SIGINT drain and stop.`;

function overridesFrom(values: Record<string, string | boolean | undefined>): Record<string, unknown> {
  const o: Record<string, any> = {};
  const num = (v: unknown) => (v === undefined ? undefined : Number(v));
  if (values['listen-host'] !== undefined) (o.listen ??= {}).host = values['listen-host'];
  if (values['listen-port'] !== undefined) (o.listen ??= {}).port = num(values['listen-port']);
  if (values['server-host'] !== undefined) (o.server ??= {}).host = values['server-host'];
  if (values['server-port'] !== undefined) (o.server ??= {}).port = num(values['server-port']);
  if (values['pool-mode'] !== undefined) (o.pool ??= {}).mode = values['pool-mode'];
  if (values['pool-size'] !== undefined) (o.pool ??= {}).default_size = num(values['pool-size']);
  if (values['log-level'] !== undefined) (o.log ??= {}).level = values['log-level'];
  return o;
}

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      config: { type: 'string', short: 'c' },
      'listen-host': { type: 'string' },
      'listen-port': { type: 'string' },
      'server-host': { type: 'string' },
      'server-port': { type: 'string' },
      'pool-mode': { type: 'string' },
      'pool-size': { type: 'string' },
      'log-level': { type: 'string' },
      port: { type: 'string' },
      'data-dir': { type: 'string' },
      'server-url': { type: 'string' },
      'auth-role': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
      version: { type: 'boolean', short: 'v' },
    },
  });
  const command = positionals[0];
  if (values.version) {
    console.log(VERSION);
    return 0;
  }
  if (values.help || !command) {
    console.log(USAGE);
    return command || values.help ? 0 : 2;
  }
  switch (command) {
    case 'check': {
      const config = loadConfig(values.config, overridesFrom(values));
      console.log(`configuration OK: listen ${config.listen.host}:${config.listen.port}, server ${config.server.host}:${config.server.port}, pool mode ${config.pool.mode}`);
      return 0;
    }
    case 'start':
      return runGateway(values.config, overridesFrom(values));
    case 'demo':
      return runDemo(values);
    case 'init':
      return runInit(values['server-url'], values['auth-role'] ?? 'trustgate_auth');
    case 'scram-verifier': {
      const password = readFileSync(0, 'utf8').replace(/\r?\n$/, '');
      console.log(makeScramVerifier(password));
      return 0;
    }
    default:
      console.error(`unknown command "${command}"\n\n${USAGE}`);
      return 2;
  }
}

async function runGateway(configPath: string | undefined, overrides: Record<string, unknown>): Promise<number> {
  const config = loadConfig(configPath, overrides);
  const gateway = createGateway(config, { configPath, overrides });
  await gateway.start();
  process.on('SIGHUP', () => {
    try {
      gateway.reload();
    } catch (err) {
      gateway.log.error({ err: (err as Error).message }, 'reload failed; keeping the previous configuration');
    }
  });
  await new Promise<void>((resolve) => {
    const stop = () => void gateway.stop().then(resolve);
    process.once('SIGTERM', stop);
    process.once('SIGINT', stop);
    gateway.once('stopped', resolve);
  });
  return 0;
}

async function runDemo(values: Record<string, string | boolean | undefined>): Promise<number> {
  const demo = await startDemo({
    port: values.port ? Number(values.port) : undefined,
    dataDir: values['data-dir'] as string | undefined,
    poolMode: values['pool-mode'] as 'session' | 'transaction' | undefined,
    logLevel: (values['log-level'] as string | undefined) ?? 'warn',
  });
  console.log(`
trustgate demo is running: gateway on port ${demo.gateway.address().port} in front of an embedded PostgreSQL ${demo.postgres.port}.

  URL (demo administrator):  ${demo.adminUrl}

  Connect through the gateway with psql (TLS verified against the demo CA):
    ${demo.psqlCommand}

  Try:  SELECT current_user, * FROM shop.products;

  Trusted sessions: the middle tier app_tier acts for end users alice and bob
  (GRANT CONNECT THROUGH app_tier TO PERMANENT alice, bob WITHOUT ROLE is in place):
    psql "${demo.appUrl}"
      SET QUERY_BAND = 'ProxyUser=alice;order=42;' FOR SESSION;
      SELECT current_user, trustgate.proxy_user(), * FROM shop.orders;   -- alice's orders only
      SET QUERY_BAND = NONE FOR SESSION;
  More rules (as the demo administrator): GRANT CONNECT THROUGH app_tier TO web_user WITH ROLE shop_clerk;

  Admin console:  psql "${demo.adminUrl.replace(/\/demo$/, '/trustgate')}" -c 'SHOW POOLS'

Press Ctrl-C to stop (PostgreSQL stops too).
`);
  await new Promise<void>((resolve) => {
    const stop = () => {
      console.log('\nstopping…');
      void demo.stop().then(resolve);
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
  return 0;
}

async function runInit(serverUrl: string | undefined, authRole: string): Promise<number> {
  if (!serverUrl) {
    console.error('trustgate init needs --server-url postgresql://SUPERUSER:PASSWORD@HOST:PORT/DATABASE');
    return 2;
  }
  const url = new URL(serverUrl);
  await installAuthFunction(
    {
      endpoint: { host: url.hostname, port: Number(url.port || 5432), tls: { mode: 'prefer' }, connectTimeoutMs: 10_000 },
      database: decodeURIComponent(url.pathname.slice(1)) || 'postgres',
      superuser: decodeURIComponent(url.username),
      superuserPassword: decodeURIComponent(url.password),
      authRole,
      authRolePassword: process.env.TRUSTGATE_AUTH_PASSWORD,
    },
    createLogger('warn'),
  );
  console.log(`installed trustgate.user_secret() for role ${authRole}`);
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    console.error(err instanceof ConfigError ? err.message : `trustgate: ${(err as Error).stack ?? err}`);
    process.exit(err instanceof ConfigError ? 2 : 1);
  },
);
