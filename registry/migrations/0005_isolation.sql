-- Jobs belong to the namespace of their repository: workers lease, and everyone reads,
-- only the jobs of namespaces their token covers.
ALTER TABLE jobs ADD COLUMN namespace TEXT NOT NULL DEFAULT '';
UPDATE jobs SET namespace = substr(repository, 1, instr(repository, '/') - 1)
    WHERE instr(repository, '/') > 0;
CREATE INDEX jobs_namespace ON jobs (namespace, state);

-- A base record proves its tensor table: the blake3 of every tensor (a JSON array in
-- tensor-table order), from which the registry recomputed the fingerprint. Empty for
-- records registered before proofs existed (used only when no proven record exists).
ALTER TABLE bases ADD COLUMN digests TEXT NOT NULL DEFAULT '';
