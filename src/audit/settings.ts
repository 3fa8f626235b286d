/**
 * The `audit` section of the configuration, resolved into what the audit log needs: where the
 * logs go (one audit database per gateway, written as the auth role), the instance name, the
 * spool directory, the statement policy. Pure apart from os.hostname()/os.tmpdir().
 */
import os from 'node:os';
import path from 'node:path';
import type { Config } from '../config/schema.js';
import type { ServerEndpoint } from '../server/server-connection.js';
import type { ControlCredentials } from '../trust/rules-store.js';
import type { StatementPolicy } from './records.js';
import type { OverflowPolicy } from './writer.js';

export interface AuditSettings {
  enabled: boolean;
  instance: string;
  /** Where the query and access logs are inserted; null = no database (JSON lines only). */
  database: { endpoint: ServerEndpoint; name: string; credentials: ControlCredentials } | null;
  spoolDir: string;
  policy: StatementPolicy;
  flushIntervalMs: number;
  batchSize: number;
  spoolAfterMs: number;
  maxQueueRecords: number;
  onOverflow: OverflowPolicy;
  synchronous: boolean;
  jsonLines: { path: string; maxBufferBytes: number } | null;
}

/**
 * hostname:port — stable across restarts of the same gateway, distinct between gateways on one
 * host. `boundPort` is the port really listened on (listen.port 0 picks a free one).
 */
export function defaultInstance(config: Config, boundPort = config.listen.port): string {
  return `${os.hostname()}:${boundPort}`;
}

/** Under the system temp directory; production should set audit.spool_dir to a persistent disk. */
export function defaultSpoolDir(instance: string): string {
  return path.join(os.tmpdir(), `trustgate-spool-${instance.replace(/[^A-Za-z0-9._-]/g, '_')}`);
}

/**
 * The audit database: `audit.database_name`, else `auth.database`, else `postgres`, on the
 * configured server, written by the auth role (`auth.user`, whose password is in `credentials`).
 */
export function resolveAuditSettings(config: Config, credentials: ControlCredentials | null, boundPort?: number): AuditSettings {
  const a = config.audit;
  const instance = a.instance ?? defaultInstance(config, boundPort);
  const dbName = a.database_name ?? config.auth.database ?? 'postgres';
  return {
    enabled: a.enabled,
    instance,
    database:
      a.database && credentials
        ? {
            endpoint: { host: config.server.host, port: config.server.port, tls: config.server.tls, connectTimeoutMs: config.server.connect_timeout_ms },
            name: dbName,
            credentials,
          }
        : null,
    spoolDir: a.spool_dir ?? defaultSpoolDir(instance),
    policy: { mode: a.statement_text, truncateAt: a.truncate_at, logParameters: a.log_parameters },
    flushIntervalMs: a.flush_interval_ms,
    batchSize: a.batch_size,
    spoolAfterMs: a.spool_after_ms,
    maxQueueRecords: a.max_queue_records,
    onOverflow: a.on_overflow,
    synchronous: a.synchronous,
    jsonLines: a.json_lines ? { path: a.json_lines.path, maxBufferBytes: a.json_lines.max_buffer_bytes } : null,
  };
}
