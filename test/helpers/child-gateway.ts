import type { Test } from 'tap'
import { spawn, type ChildProcess } from 'node:child_process'
import { tmpdir } from 'node:os'
import type { TestFleet } from './gateway.js'
import { SERVER, TS_LOADER } from './ts-loader.js'

/** A replica as a process of its own (`server.ts` through the tests' loader), which a test can SIGKILL. */
export interface ChildGateway {
  url: string
  proc: ChildProcess
  /** Resolves when the process has exited. */
  exited: Promise<{ code: number | null, signal: NodeJS.Signals | null }>
  /** Its log lines, parsed. */
  logs: any[]
}

/** Starts `server.ts` configured by `env` alone (no `.env`, none of the test's service variables); killed at teardown. */
export async function spawnGateway (t: Pick<Test, 'teardown'>, env: Record<string, string | number | undefined>): Promise<ChildGateway> {
  // A clean environment: no tap loader in NODE_OPTIONS, no developer's variables.
  const base: Record<string, string> = {}
  for (const [k, v] of Object.entries(process.env)) {
    if (v !== undefined && !/^(NODE_OPTIONS|TAP|_TAPJS|MARIADB|REDIS|ConnectionStrings|INVENTORY|LEASE|QUEUE|STARVATION|API_KEYS|ADMIN_TOKEN|USAGE|PORT|HOST)/.test(k)) base[k] = v
  }
  for (const [k, v] of Object.entries(env)) if (v !== undefined) base[k] = String(v)
  // Run from a scratch directory so no `.env` is read.
  const proc = spawn(process.execPath, [...TS_LOADER, SERVER], {
    cwd: tmpdir(),
    env: { ...base, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'info' },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null }>((resolve) => {
    proc.once('exit', (code, signal) => resolve({ code, signal }))
  })
  t.teardown(async () => {
    if (proc.exitCode == null && proc.signalCode == null) proc.kill('SIGKILL')
    await exited
  })
  const logs: any[] = []
  let stderr = ''
  proc.stderr?.on('data', (d: Buffer) => { stderr += d.toString() })
  const url = await new Promise<string>((resolve, reject) => {
    let pending = ''
    proc.stdout?.on('data', (d: Buffer) => {
      pending += d.toString()
      let nl
      while ((nl = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, nl)
        pending = pending.slice(nl + 1)
        try {
          const entry = JSON.parse(line)
          logs.push(entry)
          const m = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(String(entry.msg))
          if (m != null) resolve(m[1])
        } catch {
          logs.push(line)
        }
      }
    })
    void exited.then(({ code, signal }) => reject(new Error(`gateway exited (${code ?? signal}) before listening: ${stderr}`)))
  })
  return { url, proc, exited, logs }
}

/** The environment that points a child replica at `fleet`'s database and Redis, plus `extra`. */
export function envOf (fleet: TestFleet, extra: Record<string, string | number> = {}): Record<string, string | number | undefined> {
  const o = fleet.options as Record<string, unknown>
  return {
    MARIADB_URL: o.MARIADB_URL as string,
    REDIS_URL: o.REDIS_URL as string,
    REDIS_KEY_PREFIX: o.REDIS_KEY_PREFIX as string,
    ...extra
  }
}
