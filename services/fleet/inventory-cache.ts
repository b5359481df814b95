import { Inventory, type InventorySnapshot } from './inventory.js'

/** Where the last good inventory is shared between replicas (Redis), so a cold replica need not hit MariaDB. */
export interface SharedSnapshot {
  get: () => Promise<string | null>
  set: (json: string, ttlMs: number) => Promise<void>
  del: () => Promise<number>
}

export interface InventoryCacheOptions {
  source: 'mariadb' | 'file'
  load: () => Promise<InventorySnapshot>
  shared?: SharedSnapshot
  refreshMs: number
  log?: { warn: (obj: object, msg: string) => void }
}

export interface InventoryHealth {
  source: 'mariadb' | 'file'
  ok: boolean
  loadedAt?: number
  error?: string
}

/**
 * The inventory as the request path sees it: always the last good snapshot, read again every
 * `refreshMs`, or at once after `reload()`. A failed read keeps the last good one and says so.
 */
export class InventoryCache {
  private snapshot?: Inventory
  private timer?: NodeJS.Timeout
  private loading?: Promise<void>
  private lastError?: string
  private loadedAt?: number
  private lastWarnings = ''

  constructor (private readonly opts: InventoryCacheOptions) {}

  get current (): Inventory {
    if (this.snapshot == null) throw new Error('inventory not loaded')
    return this.snapshot
  }

  health (): InventoryHealth {
    return { source: this.opts.source, ok: this.lastError == null, loadedAt: this.loadedAt, error: this.lastError }
  }

  /** First load: from the shared copy when fresh, else the source; fails when neither answers. */
  async start (): Promise<void> {
    await this.refresh(false)
    if (this.snapshot == null) throw new Error(`cannot load the inventory from ${this.opts.source}: ${this.lastError ?? 'unknown error'}`)
    // Reading every half period, and sharing copies at most half a period old, keeps what a
    // request sees at most one period behind the database.
    this.timer = setInterval(() => { void this.refresh(false) }, Math.max(50, this.opts.refreshMs / 2))
    this.timer.unref()
  }

  /** Read again from the source, skipping the shared copy (after `DELETE /gpu/cache`). */
  async reload (): Promise<void> {
    await this.refresh(true)
  }

  /** Forget the shared copy; answers how many entries were removed. */
  async clearShared (): Promise<number> {
    return await (this.opts.shared?.del() ?? Promise.resolve(0))
  }

  private async refresh (fromSource: boolean): Promise<void> {
    // Concurrent refreshes share one read; a reload does not, since the read under way may have
    // started before the change it is asked to see (or be serving the shared copy being cleared).
    while (this.loading != null) {
      if (!fromSource) return await this.loading
      await this.loading
    }
    this.loading = this.read(fromSource).finally(() => { this.loading = undefined })
    return await this.loading
  }

  private async read (fromSource: boolean): Promise<void> {
    const { shared } = this.opts
    try {
      if (!fromSource && shared != null) {
        const json = await shared.get().catch(() => null)
        if (json != null) {
          this.snapshot = new Inventory(JSON.parse(json) as InventorySnapshot)
          this.lastError = undefined
          this.loadedAt = Date.now()
          return
        }
      }
      const snapshot = await this.opts.load()
      this.snapshot = new Inventory(snapshot)
      this.lastError = undefined
      this.loadedAt = Date.now()
      const warnings = snapshot.warnings.join('\n')
      if (warnings !== this.lastWarnings) {
        for (const w of snapshot.warnings) this.opts.log?.warn({ source: this.opts.source }, `inventory: ${w}`)
        this.lastWarnings = warnings
      }
      await shared?.set(JSON.stringify(snapshot), Math.max(50, this.opts.refreshMs / 2)).catch(() => {})
    } catch (err) {
      this.lastError = (err as Error).message
      this.opts.log?.warn({ err }, 'inventory refresh failed; serving the last good inventory')
    }
  }

  close (): void {
    if (this.timer != null) clearInterval(this.timer)
  }
}
