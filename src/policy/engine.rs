//! The Cedar engine: the schema and baseline compiled in, each organization's active version
//! combined with the baseline, and evaluation of one request.
//!
//! Decisions are cached on their exact inputs (every field of the [`Query`]) together with the
//! generation of the policies that made them: every installation (an activation, a rollback, a
//! removal) gives the organization's policies a new generation, so a cached decision made under
//! other policies is never served — it is made again by Cedar. A cached answer is the one Cedar
//! gave, with a fresh decision id.

use std::{
    collections::{HashMap, HashSet},
    str::FromStr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName, EntityUid, Policy,
    PolicyId, PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::cache::Cache;

/// The schema, in Cedar's schema syntax.
pub const SCHEMA: &str = include_str!("../../config/policies/schema.cedarschema");
/// The baseline policies every organization gets.
pub const BASELINE: &str = include_str!("../../config/policies/baseline.cedar");

/// What a resource is, with the attributes its policies read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resource {
    Organization { org_id: Uuid },
    Agent { org_id: Uuid, owner_id: Option<Uuid> },
    ApiKey { org_id: Uuid, created_by: String },
    AuditLog { org_id: Uuid },
    PolicySet { org_id: Uuid },
    Channel { org_id: Uuid, members: Vec<String> },
    Tool { org_id: Uuid, allowed_agents: Vec<String> },
    UsageReport { org_id: Uuid, subject_id: String },
    CityMap { org_id: Uuid },
    Node { org_id: Uuid },
    Platform,
    Delegation { org_id: Uuid },
}

impl Resource {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Organization { .. } => "Organization",
            Self::Agent { .. } => "Agent",
            Self::ApiKey { .. } => "ApiKey",
            Self::AuditLog { .. } => "AuditLog",
            Self::PolicySet { .. } => "PolicySet",
            Self::Channel { .. } => "Channel",
            Self::Tool { .. } => "Tool",
            Self::UsageReport { .. } => "UsageReport",
            Self::CityMap { .. } => "CityMap",
            Self::Node { .. } => "Node",
            Self::Platform => "Platform",
            Self::Delegation { .. } => "Delegation",
        }
    }

    pub fn org_id(&self) -> Option<Uuid> {
        match self {
            Self::Organization { org_id }
            | Self::Agent { org_id, .. }
            | Self::ApiKey { org_id, .. }
            | Self::AuditLog { org_id }
            | Self::PolicySet { org_id }
            | Self::Channel { org_id, .. }
            | Self::Tool { org_id, .. }
            | Self::UsageReport { org_id, .. }
            | Self::Delegation { org_id }
            | Self::CityMap { org_id }
            | Self::Node { org_id } => Some(*org_id),
            Self::Platform => None,
        }
    }

    fn attrs(&self) -> HashMap<String, RestrictedExpression> {
        let s = |v: String| RestrictedExpression::new_string(v);
        let set = |v: &[String]| RestrictedExpression::new_set(v.iter().map(|x| s(x.clone())));
        let mut attrs = HashMap::new();
        if let Some(org) = self.org_id() {
            attrs.insert("org_id".to_owned(), s(org.to_string()));
        }
        match self {
            Self::Agent { owner_id: Some(o), .. } => {
                attrs.insert("owner_id".into(), s(format!("user:{o}")));
            }
            Self::ApiKey { created_by, .. } => {
                attrs.insert("created_by".into(), s(created_by.clone()));
            }
            Self::Channel { members, .. } => {
                attrs.insert("members".into(), set(members));
            }
            Self::Tool { allowed_agents, .. } => {
                attrs.insert("allowed_agents".into(), set(allowed_agents));
            }
            Self::UsageReport { subject_id, .. } => {
                attrs.insert("subject_id".into(), s(subject_id.clone()));
            }
            _ => {}
        }
        attrs
    }
}

/// Everything the engine needs to decide one request (and, all of it, the decision cache's key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Query {
    /// `user:<uuid>`, `agent:<uuid>` or `service:<uuid>`.
    pub actor_id: String,
    /// `human`, `agent` or `service`.
    pub actor_type: String,
    pub system_admin: bool,
    /// `owner`, `admin`, `member`, `agent` or `none`, in the resource's organization.
    pub org_role: String,
    /// `None`: the credential is not limited by scopes.
    pub scopes: Option<Vec<String>>,
    pub required_scope: String,
    pub action: String,
    pub resource: Resource,
    pub resource_id: String,
    /// The caller is past a monthly usage budget (`context.budget_exceeded`).
    pub budget_exceeded: bool,
    /// Check the request and entities against the schema. Requests from outside (the PDP API)
    /// need it; the PEP builds them from typed values and skips the cost.
    pub validate: bool,
}

/// A decision, as the API reports it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Decision {
    /// `permit` or `deny`.
    pub effect: &'static str,
    /// A short machine string from the determining policy's `@reason`.
    pub reason: String,
    pub decision_id: Uuid,
    /// `baseline:<hash>`, plus `+org:v<N>` when the organization has an active version.
    pub policy_version: String,
    pub determining_policies: Vec<String>,
    /// A deny that must look like a missing resource (404, not 403): a policy marked `@hide`
    /// (the baseline's "not a member of the resource's organization") took part in it.
    #[serde(skip)]
    pub hide: bool,
}

impl Decision {
    pub fn permitted(&self) -> bool {
        self.effect == "permit"
    }
}

/// Why a request could not be evaluated: the caller sent something the schema does not allow.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

/// A policy set split by resource type: a decision only evaluates the policies that can apply to
/// its resource's type (those scoped `resource is T` or `== T::"..."`, plus the unscoped ones).
#[derive(Debug)]
pub struct Partitioned {
    by_type: HashMap<&'static str, PolicySet>,
    all: PolicySet,
}

/// Every resource type of the schema.
const RESOURCE_TYPES: &[&str] = &[
    "Organization",
    "Agent",
    "ApiKey",
    "AuditLog",
    "PolicySet",
    "Channel",
    "Tool",
    "UsageReport",
    "Platform",
    "Delegation",
];
/// The city's resource types.
const CITY_TYPES: &[&str] = &["CityMap", "Node"];

impl Partitioned {
    fn new(all: PolicySet) -> Result<Self, String> {
        use cedar_policy::ResourceConstraint as R;
        let mut by_type: HashMap<&'static str, PolicySet> = HashMap::new();
        for ty in RESOURCE_TYPES.iter().chain(CITY_TYPES) {
            let full = format!("AgentIdP::{ty}");
            let mut set = PolicySet::new();
            for p in all.policies() {
                let applies = match p.resource_constraint() {
                    R::Is(t) | R::IsIn(t, _) => t.to_string() == full,
                    R::Eq(uid) => uid.type_name().to_string() == full,
                    R::Any | R::In(_) => true,
                };
                if applies {
                    set.add(p.clone()).map_err(|e| e.to_string())?;
                }
            }
            by_type.insert(ty, set);
        }
        Ok(Self { by_type, all })
    }

    fn for_type(&self, ty: &str) -> &PolicySet {
        self.by_type.get(ty).unwrap_or(&self.all)
    }
}

/// An organization's active policies, combined with the baseline.
struct OrgPolicies {
    set: Partitioned,
    version: i32,
    /// Unique to this installation: what cached decisions made with it are tagged with.
    generation: u64,
}

/// Decisions kept by default; `0` turns the cache off.
pub const DEFAULT_DECISION_CACHE: u64 = 100_000;

/// The decision point: schema, baseline and each organization's active version.
pub struct Engine {
    schema: Schema,
    baseline: Partitioned,
    /// Parsed once: entity type names and action ids.
    types: HashMap<&'static str, EntityTypeName>,
    actions: HashMap<String, EntityUid>,
    baseline_version: String,
    orgs: RwLock<HashMap<Uuid, Arc<OrgPolicies>>>,
    /// Per organization, the read of Postgres its installed state (a version, or none) came from:
    /// a later read may replace it, an earlier one may not (see [`Engine::begin_read`]).
    read_of: RwLock<HashMap<Uuid, u64>>,
    reads: AtomicU64,
    authorizer: Authorizer,
    /// Query → (generation of the policies that decided, the decision). The baseline alone is
    /// generation 0.
    decisions: Cache<Query, (u64, Arc<Decision>)>,
    generations: AtomicU64,
}

/// Parses policy text, giving each policy the id `<prefix><@id annotation or index>`.
fn parse_policies(source: &str, prefix: &str) -> Result<Vec<Policy>, String> {
    let parsed = PolicySet::from_str(source).map_err(|e| diagnostics(&e, source))?;
    let mut out = Vec::new();
    for (i, p) in parsed.policies().enumerate() {
        let name = p.annotation("id").map(str::to_owned).unwrap_or_else(|| format!("policy{i}"));
        out.push(p.new_id(PolicyId::new(format!("{prefix}{name}"))));
    }
    if parsed.templates().next().is_some() {
        return Err("policy templates are not supported here".into());
    }
    Ok(out)
}

/// Cedar's errors with their positions (line:column), one per line.
fn diagnostics(e: &dyn miette::Diagnostic, source: &str) -> String {
    let mut lines = vec![e.to_string()];
    if let Some(labels) = e.labels() {
        for l in labels {
            let (line, col) = position(source, l.offset());
            lines.push(format!("at {line}:{col}: {}", l.label().unwrap_or("here")));
        }
    }
    if let Some(related) = e.related() {
        for r in related {
            lines.push(diagnostics(r, source));
        }
    }
    if let Some(help) = e.help() {
        lines.push(format!("help: {help}"));
    }
    lines.join("\n")
}

fn position(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

impl Engine {
    /// The engine with a decision cache of the default size.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_cache(DEFAULT_DECISION_CACHE)
    }

    /// Compiles the built-in schema and baseline; a mistake in either is a programming error
    /// caught by the unit tests, so start-up reports it rather than panicking. `cache` decisions
    /// are kept (0: none).
    pub fn with_cache(cache: u64) -> anyhow::Result<Self> {
        let (schema, _) = Schema::from_cedarschema_str(SCHEMA).map_err(|e| anyhow::anyhow!("schema: {e}"))?;
        let mut baseline = PolicySet::new();
        for p in parse_policies(BASELINE, "baseline.").map_err(|e| anyhow::anyhow!("baseline: {e}"))? {
            baseline.add(p)?;
        }
        let result = Validator::new(schema.clone()).validate(&baseline, ValidationMode::Strict);
        if !result.validation_passed() {
            let errors: Vec<String> = result.validation_errors().map(|e| e.to_string()).collect();
            anyhow::bail!("baseline does not validate: {}", errors.join("; "));
        }
        let hash = hex::encode(Sha256::digest(BASELINE.as_bytes()));
        let mut types = HashMap::new();
        for ty in RESOURCE_TYPES.iter().chain(CITY_TYPES).chain(["User", "Service"].iter()) {
            types.insert(*ty, EntityTypeName::from_str(&format!("AgentIdP::{ty}"))?);
        }
        let actions = schema
            .actions()
            .map(|uid| (uid.id().unescaped().to_owned(), uid.clone()))
            .collect::<HashMap<String, EntityUid>>();
        Ok(Self {
            schema,
            baseline: Partitioned::new(baseline).map_err(|e| anyhow::anyhow!("baseline: {e}"))?,
            types,
            actions,
            baseline_version: format!("baseline:{}", &hash[..12]),
            orgs: RwLock::new(HashMap::new()),
            read_of: RwLock::new(HashMap::new()),
            reads: AtomicU64::new(1),
            authorizer: Authorizer::new(),
            decisions: Cache::new(cache, Duration::from_secs(600)),
            generations: AtomicU64::new(1),
        })
    }

    /// Parses and validates an organization's policy text against the schema; errors carry
    /// Cedar's diagnostics with line:column positions.
    pub fn compile(&self, source: &str) -> Result<Partitioned, Vec<String>> {
        let policies = parse_policies(source, "org.").map_err(|e| vec![e])?;
        let mut combined = self.baseline.all.clone();
        for p in policies {
            combined.add(p).map_err(|e| vec![format!("{e}")])?;
        }
        let result = Validator::new(self.schema.clone()).validate(&combined, ValidationMode::Strict);
        if result.validation_passed() {
            Partitioned::new(combined).map_err(|e| vec![e])
        } else {
            Err(result.validation_errors().map(|e| diagnostics(e, source)).collect())
        }
    }

    /// A ticket for a read of the active versions, taken before the read is sent: a read that
    /// starts later sees at least what an earlier one saw, so the later ticket holds the newer
    /// state.
    pub fn begin_read(&self) -> u64 {
        self.reads.fetch_add(1, Ordering::Relaxed)
    }

    /// Installs an organization's active version (or removes it with `None`) as read with ticket
    /// `read`; what a later read installed is kept (an activation that lands while a sync is
    /// under way is never undone by the sync's older read). Returns whether it was applied.
    pub fn install(&self, org_id: Uuid, active: Option<(i32, Partitioned)>, read: u64) -> bool {
        let mut orgs = self.orgs.write().unwrap_or_else(|e| e.into_inner());
        let mut read_of = self.read_of.write().unwrap_or_else(|e| e.into_inner());
        if read_of.get(&org_id).is_some_and(|newer| *newer > read) {
            return false;
        }
        read_of.insert(org_id, read);
        match active {
            Some((version, set)) => {
                let generation = self.generations.fetch_add(1, Ordering::Relaxed);
                orgs.insert(org_id, Arc::new(OrgPolicies { set, version, generation }));
            }
            None => {
                orgs.remove(&org_id);
            }
        }
        true
    }

    /// The installed version per organization, to compare with the database.
    pub fn installed(&self) -> HashMap<Uuid, i32> {
        self.orgs.read().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (*k, v.version)).collect()
    }

    /// Decides with the baseline plus the resource's organization's active version, from the
    /// decision cache when these policies decided this exact query before.
    pub fn evaluate(&self, q: &Query) -> Result<Decision, QueryError> {
        let d = self.evaluate_shared(q)?;
        Ok(Decision { decision_id: Uuid::now_v7(), ..(*d).clone() })
    }

    /// [`Engine::evaluate`] without the copy: the cached decision itself, whose `decision_id` is
    /// the one it was first made with.
    pub fn evaluate_shared(&self, q: &Query) -> Result<Arc<Decision>, QueryError> {
        let org = self.org_policies(q);
        let generation = org.as_ref().map_or(0, |o| o.generation);
        let cache = &self.decisions;
        if !cache.enabled() {
            return self.decide(q, org.as_deref()).map(Arc::new);
        }
        if let Some((made_by, d)) = cache.get(q)
            && made_by == generation
        {
            return Ok(d);
        }
        let d = Arc::new(self.decide(q, org.as_deref())?);
        cache.insert(q.clone(), (generation, d.clone()));
        Ok(d)
    }

    /// Decides by Cedar, without the cache (the reference the cache is tested against).
    pub fn evaluate_uncached(&self, q: &Query) -> Result<Decision, QueryError> {
        self.decide(q, self.org_policies(q).as_deref())
    }

    fn org_policies(&self, q: &Query) -> Option<Arc<OrgPolicies>> {
        q.resource.org_id().and_then(|o| self.orgs.read().unwrap_or_else(|e| e.into_inner()).get(&o).cloned())
    }

    fn decide(&self, q: &Query, org: Option<&OrgPolicies>) -> Result<Decision, QueryError> {
        match org {
            Some(o) => self.evaluate_with(q, &o.set, format!("{}+org:v{}", self.baseline_version, o.version)),
            None => self.evaluate_with(q, &self.baseline, self.baseline_version.clone()),
        }
    }

    /// Decides against an explicit policy set (a draft's dry run).
    pub fn evaluate_with(&self, q: &Query, set: &Partitioned, version: String) -> Result<Decision, QueryError> {
        let set = set.for_type(q.resource.type_name());
        let bad = |e: &dyn std::fmt::Display| QueryError(e.to_string());
        let uid = |ty: &str, id: &str| -> Result<EntityUid, QueryError> {
            let name = self.types.get(ty).ok_or_else(|| QueryError(format!("unknown type {ty}")))?;
            Ok(EntityUid::from_type_name_and_id(name.clone(), EntityId::new(id)))
        };
        let principal_type = match q.actor_type.as_str() {
            "human" => "User",
            "agent" => "Agent",
            "service" => "Service",
            "node" => "Node",
            other => return Err(QueryError(format!("unknown actor_type {other:?}"))),
        };
        let principal = uid(principal_type, &q.actor_id)?;
        let action =
            self.actions.get(&q.action).cloned().ok_or_else(|| {
                QueryError(format!("unknown action {:?}", q.action.chars().take(50).collect::<String>()))
            })?;
        let resource = uid(q.resource.type_name(), &q.resource_id)?;
        let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
        let context = Context::from_pairs([
            ("actor_id".to_owned(), s(&q.actor_id)),
            ("actor_type".to_owned(), s(&q.actor_type)),
            ("system_admin".to_owned(), RestrictedExpression::new_bool(q.system_admin)),
            ("org_role".to_owned(), s(&q.org_role)),
            ("scoped".to_owned(), RestrictedExpression::new_bool(q.scopes.is_some())),
            ("scopes".to_owned(), RestrictedExpression::new_set(q.scopes.iter().flatten().map(|v| s(v)))),
            ("required_scope".to_owned(), s(&q.required_scope)),
            ("budget_exceeded".to_owned(), RestrictedExpression::new_bool(q.budget_exceeded)),
        ])
        .map_err(|e| bad(&e))?;
        let schema = q.validate.then_some(&self.schema);
        let request = Request::new(principal.clone(), action, resource.clone(), context, schema)
            .map_err(|e| QueryError(format!("the request does not fit the schema: {e}")))?;
        let mut entities = vec![Entity::new(resource, q.resource.attrs(), HashSet::new()).map_err(|e| bad(&e))?];
        // An agent acting on itself is one entity, described by its resource attributes.
        if principal != entities[0].uid() {
            entities.push(Entity::new_no_attrs(principal, HashSet::new()));
        }
        let entities = Entities::from_entities(entities, schema)
            .map_err(|e| QueryError(format!("the resource does not fit the schema: {e}")))?;
        let response = self.authorizer.is_authorized(&request, set, &entities);
        let mut determining: Vec<String> = response.diagnostics().reason().map(|id| id.to_string()).collect();
        determining.sort();
        let permit = response.decision() == CedarDecision::Allow;
        let policy = |id: &String| set.policy(&PolicyId::new(id));
        let hide = !permit && determining.iter().any(|id| policy(id).is_some_and(|p| p.annotation("hide").is_some()));
        let reason = determining
            .iter()
            .find_map(|id| policy(id).and_then(|p| p.annotation("reason")).map(str::to_owned))
            .unwrap_or_else(|| {
                // No policy decided: default deny. Say whether a higher role would have helped.
                if response.diagnostics().errors().next().is_some() {
                    "evaluation_error"
                } else if q.org_role == "none" {
                    "not_permitted"
                } else {
                    "insufficient_role"
                }
                .to_owned()
            });
        Ok(Decision {
            effect: if permit { "permit" } else { "deny" },
            reason,
            decision_id: Uuid::now_v7(),
            policy_version: version,
            determining_policies: determining,
            hide,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(org_role: &str, action: &str, resource: Resource) -> Query {
        Query {
            actor_id: "user:u1".into(),
            actor_type: "human".into(),
            system_admin: false,
            org_role: org_role.into(),
            scopes: None,
            required_scope: "orgs:read".into(),
            action: action.into(),
            resource_id: "r1".into(),
            resource,
            budget_exceeded: false,
            validate: true,
        }
    }

    #[test]
    fn the_original_examples_hold() {
        let e = Engine::new().unwrap();
        let org = Resource::Organization { org_id: Uuid::nil() };
        let d = e.evaluate(&query("owner", "manage", org.clone())).unwrap();
        assert_eq!((d.effect, d.reason.as_str()), ("permit", "microdao_owner"));
        let d = e.evaluate(&query("none", "read", org.clone())).unwrap();
        assert_eq!((d.effect, d.reason.as_str(), d.hide), ("deny", "not_microdao_member", true));
        // An outsider is hidden from whatever else denies too (here: a missing scope).
        let mut q = query("none", "read", org.clone());
        q.scopes = Some(vec![]);
        let d = e.evaluate(&q).unwrap();
        assert_eq!((d.reason.as_str(), d.hide), ("insufficient_scope", true));
        let d = e.evaluate(&query("member", "delete", org.clone())).unwrap();
        assert_eq!((d.effect, d.hide), ("deny", false));
        let channel = Resource::Channel { org_id: Uuid::nil(), members: vec!["user:u1".into()] };
        let d = e.evaluate(&query("member", "send_message", channel)).unwrap();
        assert_eq!((d.effect, d.reason.as_str()), ("permit", "channel_member"));
        let mut q = query(
            "agent",
            "execute",
            Resource::Tool { org_id: Uuid::nil(), allowed_agents: vec!["agent:other".into()] },
        );
        q.actor_type = "agent".into();
        q.actor_id = "agent:a1".into();
        let d = e.evaluate(&q).unwrap();
        assert_eq!((d.effect, d.reason.as_str()), ("deny", "tool_not_allowed"));
        assert_eq!(d.determining_policies, vec!["baseline.tool-not-allowed".to_owned()]);
    }

    #[test]
    fn scopes_are_part_of_the_decision() {
        let e = Engine::new().unwrap();
        let mut q = query("owner", "read", Resource::Organization { org_id: Uuid::nil() });
        q.scopes = Some(vec!["audit:read".into()]);
        let d = e.evaluate(&q).unwrap();
        assert_eq!((d.effect, d.reason.as_str()), ("deny", "insufficient_scope"));
        q.scopes = Some(vec!["orgs:read".into()]);
        assert!(e.evaluate(&q).unwrap().permitted());
    }

    #[test]
    fn drafts_are_validated_with_positions() {
        let e = Engine::new().unwrap();
        let errs = e.compile("permit(principal, action, resource) when { resource.nope == 1 };").unwrap_err();
        assert!(errs.join(" ").contains("at 1:"), "{errs:?}");
        let errs = e.compile("permit(principal, action,").unwrap_err();
        assert!(!errs.is_empty());
        assert!(e.compile("@reason(\"members_manage\") permit(principal, action == AgentIdP::Action::\"manage_members\", resource is AgentIdP::Organization) when { context.org_role == \"member\" };").is_ok());
    }

    /// Queries over every role, action, resource type, scope set and admin flag.
    fn generated_queries(org: Uuid) -> Vec<Query> {
        let resources = [
            Resource::Organization { org_id: org },
            Resource::Agent { org_id: org, owner_id: Some(Uuid::nil()) },
            Resource::Agent { org_id: org, owner_id: None },
            Resource::ApiKey { org_id: org, created_by: "user:u1".into() },
            Resource::AuditLog { org_id: org },
            Resource::PolicySet { org_id: org },
            Resource::Channel { org_id: org, members: vec!["user:u1".into()] },
            Resource::Tool { org_id: org, allowed_agents: vec!["agent:a1".into()] },
            Resource::UsageReport { org_id: org, subject_id: "agent:a1".into() },
            Resource::CityMap { org_id: org },
            Resource::Node { org_id: org },
            Resource::Platform,
        ];
        let mut out = Vec::new();
        for resource in resources {
            for role in ["owner", "admin", "member", "agent", "none"] {
                for action in ["read", "create", "update", "delete", "manage", "execute", "send_message", "administer"]
                {
                    for (i, scopes) in [None, Some(vec!["orgs:read".to_owned()]), Some(vec![])].into_iter().enumerate()
                    {
                        let mut q = query(role, action, resource.clone());
                        q.scopes = scopes;
                        q.system_admin = i == 2 && role == "none";
                        if role == "agent" {
                            q.actor_type = "agent".into();
                            q.actor_id = "agent:a1".into();
                        }
                        out.push(q);
                    }
                }
            }
        }
        out
    }

    /// The same answer: the same decision (but for its id), or the same refusal of the query.
    fn same(a: &Result<Decision, QueryError>, b: &Result<Decision, QueryError>) -> bool {
        match (a, b) {
            (Ok(a), Ok(b)) => {
                (a.effect, &a.reason, &a.policy_version, &a.determining_policies, a.hide)
                    == (b.effect, &b.reason, &b.policy_version, &b.determining_policies, b.hide)
            }
            (Err(a), Err(b)) => a.0 == b.0,
            _ => false,
        }
    }

    #[test]
    fn cached_decisions_are_the_ones_cedar_makes() {
        let e = Engine::new().unwrap();
        let org = Uuid::new_v4();
        let queries = generated_queries(org);
        assert!(queries.len() > 1000);
        let (mut permits, mut denies) = (0, 0);
        for round in 0..2 {
            for q in &queries {
                let cached = e.evaluate(q);
                let cedar = e.evaluate_uncached(q);
                assert!(same(&cached, &cedar), "round {round}: {q:?}: {cached:?} vs {cedar:?}");
                match cedar {
                    Ok(d) if d.permitted() => permits += 1,
                    Ok(_) => denies += 1,
                    Err(_) => {}
                }
            }
        }
        assert!(permits > 100 && denies > 100, "the set has permits ({permits}) and denies ({denies})");
        // Each answer has its own id, cached or not.
        let q = &queries[0];
        assert_ne!(e.evaluate(q).unwrap().decision_id, e.evaluate(q).unwrap().decision_id);
    }

    #[test]
    fn a_new_policy_version_is_never_answered_from_the_cache() {
        let e = Engine::new().unwrap();
        let org = Uuid::new_v4();
        let q = query("member", "delete", Resource::Organization { org_id: org });
        assert!(!e.evaluate(&q).unwrap().permitted());
        e.install(
            org,
            Some((1, e.compile("@reason(\"anyone\") permit(principal, action, resource);").unwrap())),
            e.begin_read(),
        );
        let d = e.evaluate(&q).unwrap();
        assert_eq!((d.effect, d.reason.as_str()), ("permit", "anyone"));
        // The same version number again (a rollback to it) is a new installation too.
        e.install(
            org,
            Some((1, e.compile("@reason(\"nobody\") forbid(principal, action, resource);").unwrap())),
            e.begin_read(),
        );
        let d = e.evaluate(&q).unwrap();
        assert_eq!((d.effect, d.reason.as_str()), ("deny", "nobody"));
        e.install(org, None, e.begin_read());
        assert!(same(&e.evaluate(&q), &e.evaluate_uncached(&q)));
        assert!(!e.evaluate(&q).unwrap().permitted());
        for q in generated_queries(org) {
            assert!(same(&e.evaluate(&q), &e.evaluate_uncached(&q)), "{q:?}");
        }
    }

    #[test]
    fn an_older_read_never_replaces_a_newer_one() {
        let e = Engine::new().unwrap();
        let org = Uuid::new_v4();
        let (older, newer) = (e.begin_read(), e.begin_read());
        assert!(e.install(org, Some((2, e.compile("").unwrap())), newer));
        assert!(!e.install(org, None, older), "an older read of no active version");
        assert!(!e.install(org, Some((1, e.compile("").unwrap())), older), "an older read of version 1");
        assert_eq!(e.installed().get(&org), Some(&2));
        assert!(e.install(org, None, e.begin_read()));
        assert_eq!(e.installed().get(&org), None);
        assert!(!e.install(org, Some((2, e.compile("").unwrap())), newer), "removed by a later read");
    }

    #[test]
    fn an_org_cannot_override_a_baseline_forbid() {
        let e = Engine::new().unwrap();
        let set = e.compile("@reason(\"anyone\") permit(principal, action, resource);").unwrap();
        let org = Uuid::new_v4();
        e.install(org, Some((1, set)), e.begin_read());
        let d = e.evaluate(&query("none", "read", Resource::Organization { org_id: org })).unwrap();
        assert_eq!((d.effect, d.reason.as_str()), ("deny", "not_microdao_member"));
        let d = e.evaluate(&query("member", "delete", Resource::Organization { org_id: org })).unwrap();
        assert_eq!((d.effect, d.reason.as_str()), ("permit", "anyone"));
        assert!(d.policy_version.ends_with("+org:v1"));
    }
}
