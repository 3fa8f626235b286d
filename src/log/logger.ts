/** Structured logging (pino). Every connection-scoped line carries a `conn` id via child loggers. */
import { pino, type Logger } from 'pino';

export type { Logger };

export function createLogger(level: string, destination?: NodeJS.WritableStream): Logger {
  return pino(
    {
      level,
      base: { svc: 'trustgate' },
      timestamp: pino.stdTimeFunctions.isoTime,
      // Secrets must never reach a log line, even by accident.
      redact: { paths: ['password', '*.password', 'secret', '*.secret'], censor: '[redacted]' },
    },
    destination as pino.DestinationStream | undefined,
  );
}

let connectionCounter = 0;
/** Short, unique-per-process connection ids: c1, c2, … for clients; s1, s2, … for servers. */
export function nextConnectionId(prefix: 'c' | 's' | 'p'): string {
  return `${prefix}${++connectionCounter}`;
}
