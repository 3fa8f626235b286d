/**
 * The admin console: a virtual database (`trustgate` by default) that speaks SHOW/RELOAD commands
 * over the simple query protocol, like PgBouncer's `pgbouncer` database.
 */
import { TxStatus } from '../protocol/constants.js';
import { commandComplete, dataRow, errorResponse, readyForQuery, rowDescription } from '../protocol/backend.js';
import { PgError, SqlState } from '../protocol/sqlstate.js';

export interface AdminTable {
  columns: string[];
  rows: (string | number | boolean | null)[][];
}

/** What the console reads from and acts on. */
export interface AdminTarget {
  showPools(): AdminTable;
  showClients(): AdminTable;
  showServers(): AdminTable;
  showStats(): AdminTable;
  showConfig(): AdminTable;
  showTrust(): AdminTable;
  showAudit(): AdminTable;
  version(): string;
  reload(): void;
  shutdown(): void;
}

const HELP: AdminTable = {
  columns: ['command', 'description'],
  rows: [
    ['SHOW POOLS', 'pools per (database, user): clients and server connections by state'],
    ['SHOW CLIENTS', 'client connections'],
    ['SHOW SERVERS', 'server connections'],
    ['SHOW STATS', 'counters per pool'],
    ['SHOW CONFIG', 'effective configuration'],
    ['SHOW TRUST', 'CONNECT THROUGH rules cached per database (trusted sessions)'],
    ['SHOW AUDIT', 'query and access log writer: queue, database, spool, drops'],
    ['SHOW VERSION', 'trustgate version'],
    ['RELOAD', 'reread the configuration file without dropping connections'],
    ['SHUTDOWN', 'drain clients and stop the gateway'],
  ],
};

function table(t: AdminTable, tag: string): Buffer[] {
  const out = [rowDescription(t.columns)];
  for (const r of t.rows) out.push(dataRow(r.map((v) => (v === null ? null : String(v)))));
  out.push(commandComplete(`${tag} ${t.rows.length}`));
  return out;
}

/** Runs one admin command; returns the complete reply ending with ReadyForQuery. */
export function runAdminCommand(sql: string, target: AdminTarget): Buffer {
  const words = sql.trim().replace(/;\s*$/, '').trim().split(/\s+/).map((w) => w.toUpperCase());
  let reply: Buffer[];
  try {
    reply = dispatch(words, target);
  } catch (err) {
    const e = err instanceof PgError ? err : new PgError(SqlState.InternalError, (err as Error).message);
    reply = [errorResponse(e)];
  }
  reply.push(readyForQuery(TxStatus.Idle));
  return Buffer.concat(reply);
}

function dispatch(words: string[], target: AdminTarget): Buffer[] {
  const [verb, what] = words;
  if (verb === 'SHOW') {
    switch (what) {
      case 'POOLS':
        return table(target.showPools(), 'SHOW');
      case 'CLIENTS':
        return table(target.showClients(), 'SHOW');
      case 'SERVERS':
        return table(target.showServers(), 'SHOW');
      case 'STATS':
        return table(target.showStats(), 'SHOW');
      case 'CONFIG':
        return table(target.showConfig(), 'SHOW');
      case 'TRUST':
        return table(target.showTrust(), 'SHOW');
      case 'AUDIT':
        return table(target.showAudit(), 'SHOW');
      case 'VERSION':
        return table({ columns: ['version'], rows: [[target.version()]] }, 'SHOW');
      case 'HELP':
      case undefined:
        return table(HELP, 'SHOW');
    }
  }
  if (verb === 'RELOAD' && words.length === 1) {
    target.reload();
    return [commandComplete('RELOAD')];
  }
  if (verb === 'SHUTDOWN' && words.length === 1) {
    target.shutdown();
    return [commandComplete('SHUTDOWN')];
  }
  if (verb === '' || verb === undefined) return [Buffer.from([0x49, 0, 0, 0, 4])]; // EmptyQueryResponse
  throw new PgError(SqlState.SyntaxError, `unknown admin command: ${words.join(' ')}; try SHOW HELP`);
}
