/**
 * Which diffusion server holds an uploaded file. A Stable Diffusion server keeps `/upload`ed files
 * to itself, so an `/img2img` naming that `file_id` must go to the same server; with several
 * servers of a model, choosing freely would answer "File not found" most of the time.
 */
export interface PinStore {
  get: (key: string) => Promise<string | null>
  set: (key: string, value: string, ttlMs: number) => Promise<void>
}

/** Uploads are short-lived inputs: a day is ample for the img2img calls that use them. */
const PIN_TTL_MS = 24 * 60 * 60 * 1000

/** In-process pins kept at most (~100 bytes each): uploads arrive faster than a day expires them. */
const MAX_PINS = 100_000

export class UploadPins {
  private readonly memory = new Map<string, { assignmentId: string, expiresAt: number }>()

  /**
   * `shared` (Redis) lets every replica see every upload; without it, pins live in this process,
   * at most `maxPins` of them (the oldest forgotten first).
   */
  constructor (private readonly shared?: PinStore, private readonly prefix = '', private readonly maxPins = MAX_PINS) {}

  // File ids come from clients: hex keeps them from acting as key separators or globs.
  private key (fileId: string): string {
    return `${this.prefix}upload:${Buffer.from(fileId, 'utf8').toString('hex')}`
  }

  async pin (fileId: string, assignmentId: string): Promise<void> {
    if (this.shared != null) {
      await this.shared.set(this.key(fileId), assignmentId, PIN_TTL_MS)
      return
    }
    // Deleted first, so a pin set again moves to the newest place (a Map keeps first insertion order).
    this.memory.delete(fileId)
    this.memory.set(fileId, { assignmentId, expiresAt: Date.now() + PIN_TTL_MS })
    // Oldest first: forget expired pins as new ones come, and the oldest past the cap.
    for (const [id, pin] of this.memory) {
      if (pin.expiresAt > Date.now() && this.memory.size <= this.maxPins) break
      this.memory.delete(id)
    }
  }

  async find (fileId: string): Promise<string | undefined> {
    if (this.shared != null) return (await this.shared.get(this.key(fileId))) ?? undefined
    const pin = this.memory.get(fileId)
    return pin != null && pin.expiresAt > Date.now() ? pin.assignmentId : undefined
  }
}
