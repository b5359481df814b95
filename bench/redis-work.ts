/** The lease scripts' work in Redis over a window (INFO commandstats, read before and after), and Redis's pid. */
import { Redis } from 'ioredis'
import { fmt } from './report.js'

export interface ScriptWork {
  /** EVALSHA calls */
  scripts: number
  /** their time in Redis, µs (the scripts' own, without the network) */
  scriptUs: number
  /** the Redis commands those scripts ran (every other command counted, bar INFO itself) */
  innerCalls: number
}

let statsClient: Redis | undefined

export async function scriptWork (redisUrl: string): Promise<ScriptWork> {
  statsClient ??= new Redis(redisUrl, { maxRetriesPerRequest: 1 })
  const info = await statsClient.info('commandstats')
  const out: ScriptWork = { scripts: 0, scriptUs: 0, innerCalls: 0 }
  for (const m of info.matchAll(/^cmdstat_([a-z_|]+):calls=(\d+),usec=(\d+)/gm)) {
    if (m[1] === 'evalsha') {
      out.scripts += Number(m[2])
      out.scriptUs += Number(m[3])
    } else if (m[1] !== 'info') {
      out.innerCalls += Number(m[2])
    }
  }
  return out
}

export function closeScriptWork (): void {
  statsClient?.disconnect()
  statsClient = undefined
}

export const workSince = (a: ScriptWork, b: ScriptWork): ScriptWork =>
  ({ scripts: b.scripts - a.scripts, scriptUs: b.scriptUs - a.scriptUs, innerCalls: b.innerCalls - a.innerCalls })

/** Per request: scripts, µs per script, Redis calls per script. */
export const scriptText = (w: ScriptWork, requests: number): string =>
  `Redis ${fmt(w.scripts / requests, 1)} scripts per request, ${fmt(w.scriptUs / w.scripts, 0)} µs and ${fmt(w.innerCalls / w.scripts, 1)} calls per script`

export const scriptSummary = (w: ScriptWork, requests: number): object =>
  ({ scriptsPerRequest: +fmt(w.scripts / requests, 2), usPerScript: Math.round(w.scriptUs / w.scripts), callsPerScript: +fmt(w.innerCalls / w.scripts, 1) })

export async function redisPid (redisUrl: string): Promise<number | undefined> {
  const client = new Redis(redisUrl, { lazyConnect: true, maxRetriesPerRequest: 0, connectTimeout: 2000 })
  try {
    await client.connect()
    const info = await client.info('server')
    const pid = Number(/process_id:(\d+)/.exec(info)?.[1])
    return Number.isFinite(pid) && pid > 0 ? pid : undefined
  } catch (err) {
    throw new Error(`Redis at ${redisUrl} is not reachable (${(err as Error).message}); the benchmark measures the Redis lease path`)
  } finally {
    client.disconnect()
  }
}
