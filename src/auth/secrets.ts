/**
 * Where client secrets come from: a users file (SCRAM verifiers or md5 hashes, never plaintext)
 * and/or an auth query run in the server through a restricted function, as PgBouncer does.
 */
import { readFileSync } from 'node:fs';
import { parse as parseYaml } from 'yaml';
import { parseScramVerifier, type ScramSecret } from './scram.js';
import { isMd5Hash } from './md5.js';
import { ServerConnection, type ServerEndpoint } from '../server/server-connection.js';
import type { Logger } from '../log/logger.js';

export type UserSecret = { kind: 'scram'; scram: ScramSecret } | { kind: 'md5'; hash: string };

export function parseSecret(text: string | null | undefined): UserSecret | null {
  if (!text) return null;
  const scram = parseScramVerifier(text);
  if (scram) return { kind: 'scram', scram };
  if (isMd5Hash(text)) return { kind: 'md5', hash: text };
  return null;
}

export class SecretsError extends Error {}

/** Reads a users file: `users: { name: "SCRAM-SHA-256$…" | "md5…" }`. Plaintext is refused. */
export function readUsersFile(path: string): Map<string, UserSecret> {
  const doc = parseYaml(readFileSync(path, 'utf8')) as { users?: Record<string, unknown> } | null;
  const users = new Map<string, UserSecret>();
  for (const [name, value] of Object.entries(doc?.users ?? {})) {
    const secret = parseSecret(typeof value === 'string' ? value : null);
    if (!secret) {
      throw new SecretsError(`users file ${path}: users.${name} must be a SCRAM-SHA-256 verifier or an md5 hash (plaintext passwords are not accepted)`);
    }
    users.set(name, secret);
  }
  return users;
}

export interface AuthQuerySettings {
  query: string;
  user: string;
  /** The auth user's own credentials: its password from the environment, or its users-file secret is not enough. */
  password: string;
  database: string | undefined;
  endpoint: ServerEndpoint;
}

/** Looks secrets up on the server; one connection per database, queries run one at a time. */
export class SecretStore {
  private fileUsers = new Map<string, UserSecret>();
  private readonly authConnections = new Map<string, Promise<ServerConnection>>();
  private readonly queues = new Map<string, Promise<unknown>>();

  private authQuery: AuthQuerySettings | null = null;

  constructor(
    usersFile: string | undefined,
    authQuery: AuthQuerySettings | null,
    private readonly log: Logger,
  ) {
    this.reload(usersFile, authQuery);
  }

  reload(usersFile: string | undefined, authQuery: AuthQuerySettings | null): void {
    this.fileUsers = usersFile ? readUsersFile(usersFile) : new Map();
    this.authQuery = authQuery;
    this.close();
  }

  async lookup(user: string, database: string): Promise<UserSecret | null> {
    const fromFile = this.fileUsers.get(user);
    if (fromFile) return fromFile;
    if (!this.authQuery) return null;
    const db = this.authQuery.database ?? database;
    const prev = this.queues.get(db) ?? Promise.resolve();
    const run = prev.catch(() => undefined).then(() => this.runAuthQuery(db, user));
    this.queues.set(db, run);
    return run;
  }

  private async runAuthQuery(database: string, user: string): Promise<UserSecret | null> {
    const aq = this.authQuery!;
    let connP = this.authConnections.get(database);
    if (!connP) {
      connP = ServerConnection.connect(aq.endpoint, database, aq.user, { password: aq.password }, new Map([['application_name', 'trustgate auth']]), this.log);
      this.authConnections.set(database, connP);
      connP.then(
        (c) => c.addCloseListener(() => this.authConnections.delete(database)),
        () => this.authConnections.delete(database),
      );
    }
    const conn = await connP;
    const result = await conn.internalQuery(aq.query, [user]);
    const row = result.rows[0];
    if (!row) return null;
    return parseSecret(row[1]);
  }

  close(): void {
    for (const p of this.authConnections.values()) p.then((c) => c.terminate(), () => undefined);
    this.authConnections.clear();
  }
}
