// Types for portcullis.js (the module's JSDoc says the same).

export interface Session {
  session_id: string;
  session_token: string;
  expires_at: string;
  session_expires_at: string;
  user: string;
}

export type State = 'connecting' | 'open' | 'waiting' | 'offline' | 'signed_out' | 'closed';

export interface Options {
  baseUrl?: string;
  path: string;
  onRelogin?: (why: { code: number; reason: string; error?: string }) => void;
  onMessage?: (data: string | ArrayBuffer, seq: number | null) => void;
  onRole?: (role: { role: 'owner' | 'reader'; ownerPresent: boolean | null }) => void;
  onGap?: (gap: { expected: number | null; got: number }) => void;
  onState?: (state: State, detail?: Record<string, unknown>) => void;
  onHello?: (hello: Record<string, unknown>) => void;
  baseDelayMs?: number;
  maxDelayMs?: number;
  openTimeoutMs?: number;
  sessionStorage?: Storage | null;
  tokenStorage?: Storage | null;
  WebSocket?: typeof WebSocket;
  fetch?: typeof fetch;
  random?: () => number;
}

export class PortcullisError extends Error {
  status: number;
  code: string;
  retryAfter: number | null;
}

export class PortcullisClient {
  constructor(opts: Options);
  session: Session | null;
  role: 'owner' | 'reader' | null;
  ownerPresent: boolean | null;
  mode: 'exclusive' | 'shared' | null;
  /** Sockets opened so far. */
  handshakes: number;
  /** Shared routes: the number of the next runtime frame. */
  next: number | null;
  login(username: string, password: string): Promise<Session>;
  refresh(): Promise<Session>;
  logout(): Promise<void>;
  adopt(session: Session): void;
  connect(): void;
  disconnect(): void;
  reconnect(): void;
  send(data: string | ArrayBufferLike | Blob | ArrayBufferView): boolean;
  close(): void;
  delay(attempt: number, retryAfter?: number): number;
}
